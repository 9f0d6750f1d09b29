"""The tests' own view of a process group, independent of the code under test (spleen_tools.procs)."""

from __future__ import annotations

import os

import psutil


def live_group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of process group ``pgid`` (a zombie runs nothing: its parent just has not reaped it)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue  # gone while we looked
    return members
