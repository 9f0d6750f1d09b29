"""The process layer: liveness against PID reuse, tree termination, locks, the pids file."""

from __future__ import annotations

import os
import subprocess

import pytest

from spleen_tools.procs import (
    HostLock,
    PidFile,
    ProcessRef,
    process_tree,
    start_group,
    stop_started,
    terminate,
    wait_for,
)


@pytest.fixture
def sleeper(tmp_path):
    procs = []

    def start(cmd=("sleep", "120")) -> subprocess.Popen:
        procs.append(start_group(list(cmd), tmp_path / "sleep.log"))
        return procs[-1]

    yield start
    for proc in procs:
        stop_started(proc, grace=1)


def group_alive(pgid: int) -> bool:
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 0


def test_liveness_checks_the_creation_time(sleeper):
    proc = sleeper()
    ref = ProcessRef.of(proc.pid)
    assert ref.alive() and ref.created is not None
    assert not ProcessRef(proc.pid, ref.created - 1).alive(), "same PID, another process"
    assert not ProcessRef(proc.pid, None).alive()
    assert ProcessRef.from_json(ref.to_json()) == ref


def test_a_reused_pid_is_never_signalled(sleeper):
    proc = sleeper()
    stranger = ProcessRef(proc.pid, ProcessRef.of(proc.pid).created - 1)
    assert process_tree([stranger]) == [] and terminate([stranger], grace=1) == []
    assert proc.poll() is None


def test_terminate_ends_a_group_whose_leader_exited(sleeper):
    leader = sleeper(["sh", "-c", "sleep 60 & sleep 60 & exit 0"])
    leader.wait(timeout=5)
    assert group_alive(leader.pid)
    assert terminate([ProcessRef(leader.pid, None)], grace=5) == []
    assert not group_alive(leader.pid)


def test_terminate_reaches_descendants_in_their_own_session(sleeper, tmp_path):
    """NVFlare starts jobs with setsid: a group kill alone would miss them."""
    child_file = tmp_path / "child.pid"
    proc = sleeper(["bash", "-c", f"setsid sleep 120 & echo $! > {child_file}; sleep 120"])
    wait_for(lambda: child_file.is_file() and child_file.read_text().strip() != "", 10, "child started")
    child = ProcessRef.of(int(child_file.read_text()))
    assert child.alive()
    assert terminate([ProcessRef.of(proc.pid)], grace=5) == []
    proc.wait(timeout=5)
    assert not child.alive()


def test_terminate_kills_what_ignores_sigterm(sleeper):
    proc = sleeper(["bash", "-c", "trap '' TERM; sleep 120 & wait"])
    wait_for(lambda: len(process_tree([ProcessRef.of(proc.pid)])) == 2, 10, "child started")
    assert terminate([ProcessRef.of(proc.pid)], grace=0.5) == []
    assert not group_alive(proc.pid)


def test_host_lock_is_exclusive_and_names_the_holder(tmp_path):
    path = tmp_path / "x.lock"
    with HostLock(path, "first", busy=lambda holder: RuntimeError(f"held by {holder}")):
        with pytest.raises(RuntimeError, match=f"held by pid {os.getpid()}, first"):
            HostLock(path, "second", busy=lambda holder: RuntimeError(f"held by {holder}")).acquire()
    HostLock(path, "third", busy=RuntimeError).acquire().release()


def test_pid_file_records_and_finds_processes(tmp_path, sleeper):
    proc = sleeper()
    pids = PidFile(tmp_path / "pids.json")
    pids.update(runner=ProcessRef.of(os.getpid()), mlflow=ProcessRef.of(proc.pid), job_id="abc")
    pids.update(poc={"workspace": "/w", "processes": {"server": ProcessRef(1234567, None).to_json()}})
    assert pids.read()["job_id"] == "abc"
    refs = pids.refs()
    assert {r.pid for r in refs} == {proc.pid, 1234567}, "the runner itself is left out"
    assert [r.pid for r in refs if r.alive()] == [proc.pid]
