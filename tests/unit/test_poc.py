"""The POC system's lock, port check and pids entry (the system itself runs in tests/e2e)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from spleen_tools.procs import ProcessRef, start_group
from spleen_tools.systems import poc


def test_poc_lock_is_exclusive(tmp_path, monkeypatch):
    monkeypatch.setattr("spleen_tools.systems.poc.LOCK_DIR", tmp_path)
    with poc.poc_lock("first run", port=1):
        with pytest.raises(poc.PocBusyError, match=f"another POC run is active \\(pid {os.getpid()}, first run\\)"):
            poc.poc_lock("second run", port=1).acquire()
    with poc.poc_lock("third run", port=1):  # released: free again
        pass


def test_ports_in_use_are_named(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        monkeypatch.setattr("spleen_tools.systems.poc.SERVER_PORTS", (port,))
        with pytest.raises(poc.PocBusyError, match=f"port\\(s\\) {port} on 127.0.0.1 are in use"):
            poc.check_ports()


def test_stop_recorded_ends_the_group_of_poc_start(tmp_path):
    """What --stop does with a run's "poc" entry: the starter's group goes, even after the starter itself exited."""
    starter = start_group(["sh", "-c", "sleep 60 & sleep 60 & exit 0"], tmp_path / "log")
    starter.wait(timeout=5)
    record = {
        "workspace": str(tmp_path / "poc"),
        "home": str(tmp_path / "home"),
        "processes": {poc.STARTER: ProcessRef(starter.pid, None).to_json()},
    }
    group = ["pgrep", "-g", str(starter.pid)]
    assert subprocess.run(group, capture_output=True).returncode == 0, "the sleeps run on in the group"
    assert poc.stop_recorded(record) == []
    assert subprocess.run(group, capture_output=True).returncode == 1
