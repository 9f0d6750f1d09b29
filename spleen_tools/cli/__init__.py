"""Thin command-line entry points over the host package."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Bad input -> one line ``error: ...`` on stderr, exit 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default said once: none added where the help names its own default, or where there is none to say
    (``None``, a flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)
