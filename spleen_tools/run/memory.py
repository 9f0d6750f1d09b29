"""The server's peak memory during a run: the resident set of its process tree (the server and its job process),
sampled in the background, because NVFlare reports none and the peak comes and goes with aggregation."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil

from spleen_tools.procs import PidFile, ProcessRef


class PeakMemory(threading.Thread):
    """Peak resident memory (MB) of a process and its descendants, sampled every ``interval`` seconds; the process
    is looked up with ``find`` until it is known (it may not exist yet)."""

    def __init__(self, find: Callable[[], psutil.Process | None], interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="peak-memory")
        self.find = find
        self.interval = interval
        self.peak_mb = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        process = None
        while not self._done.wait(self.interval):
            try:
                process = process or self.find()
                if process is not None:
                    tree = [process, *process.children(recursive=True)]
                    self.peak_mb = max(self.peak_mb, sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                continue  # a job process came or went between the listing and the reading

    def stop(self) -> float:
        self._done.set()
        self.join(timeout=5)
        return round(self.peak_mb, 1)


def recorded_server(pid_file: PidFile, kind: str) -> Callable[[], psutil.Process | None]:
    """A ``find`` for :class:`PeakMemory`: the server process a system of ``kind`` recorded in the run's pids.json."""

    def find() -> psutil.Process | None:
        record = ((pid_file.read().get(kind) or {}).get("processes") or {}).get("server")
        return ProcessRef.from_json(record).process() if record else None

    return find
