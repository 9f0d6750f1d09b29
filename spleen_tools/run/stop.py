"""Stopping what a run started: signals turned into cleanup, and ``--stop RUN_DIR`` from the run's ``pids.json``.

A run records each system under its kind (``"poc"``, ``"secure"``) and the MLflow server under ``"mlflow"``;
stopping hands each entry to the module of the system that wrote it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from spleen_tools.procs import PidFile, ProcessRef, terminate
from spleen_tools.run.settings import SettingsError, Terminated
from spleen_tools.systems import poc, secure

PIDS_FILE = "pids.json"
MLFLOW = "mlflow"
STOPPERS: dict[str, Callable[[dict], list[int]]] = {poc.KIND: poc.stop_recorded, secure.KIND: secure.stop_recorded}


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block, so the cleanup in ``finally`` runs (as on Ctrl-C)."""

    def handler(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """While we stop things, a second Ctrl-C or SIGTERM must not leave orphans."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def alive_pids(pid_file: PidFile) -> list[int]:
    """Recorded processes of a run (the runner itself left out) that are still alive."""
    return [ref.pid for ref in pid_file.refs() if ref.alive()]


def stop_all_recorded(pid_file: PidFile) -> list[int]:
    """Stop every system and server recorded in ``pid_file``; returns the PIDs still alive (none on success)."""
    data = pid_file.read()
    left = []
    for kind, stop in STOPPERS.items():
        if isinstance(data.get(kind), dict):
            left += stop(data[kind])
    if isinstance(data.get(MLFLOW), dict):
        left += terminate([ProcessRef.from_json(data[MLFLOW])])
    return left


def stop_run(run_dir: Path, out: Callable[[str], None] = print) -> int:
    """Stop what a ``--keep-running`` run left up, from its ``pids.json``; 0 when nothing is left."""
    pid_file = PidFile(Path(run_dir).resolve() / PIDS_FILE)
    if not pid_file.path.is_file():
        raise SettingsError(f"{pid_file.path.parent} has no {PIDS_FILE}: not a run directory")
    left = stop_all_recorded(pid_file)
    if left:
        out(f"still alive: {left}")
        return 1
    out(f"stopped everything recorded in {pid_file.path}")
    return 0
