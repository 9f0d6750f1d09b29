"""Thin command-line entry points over the host package."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Bad input -> one line ``error: ...`` on stderr, exit 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")
