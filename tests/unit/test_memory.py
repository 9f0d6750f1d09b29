"""The server's peak memory as the one command samples it: a real process tree, found through a run's pids.json."""

from __future__ import annotations

import subprocess
import sys
import time

from spleen_tools.procs import PidFile, ProcessRef
from spleen_tools.run.memory import PeakMemory, recorded_server

# a parent that starts a child holding 150 MB: the peak counts the whole tree
TREE = (
    "import subprocess, sys, time; "
    "c = subprocess.Popen([sys.executable, '-c', 'x = bytearray(150 * 2**20); import time; time.sleep(4)']); "
    "time.sleep(4); c.wait()"
)


def test_peak_memory_of_the_recorded_server_tree(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", TREE])
    try:
        pid_file = PidFile(tmp_path / "pids.json")
        find = recorded_server(pid_file, "poc")
        assert find() is None  # not recorded yet: sampling waits
        pid_file.update(poc={"processes": {"server": ProcessRef.of(proc.pid).to_json()}})
        memory = PeakMemory(find, interval=0.1)
        memory.start()
        time.sleep(2.5)
        peak = memory.stop()
    finally:
        proc.kill()
        proc.wait()
    assert 150 <= peak < 1000, peak
