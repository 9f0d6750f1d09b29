"""The secure system without starting NVFlare: preflight errors naming the fix, the state file, stopping, PID reuse."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from secure_kits import fake_kits

from spleen_tools.procs import ProcessRef, free_port, start_group, stop_started
from spleen_tools.systems.base import FLSystem
from spleen_tools.systems.secure import SecureSystem, preflight, stop_system
from spleen_tools.systems.secure_workspace import SecureBusyError, SecureError, provision, running_pids, state_path


def record(workspace: Path, proc: subprocess.Popen, created: float | None = None) -> None:
    """A system.json as SecureSystem.start() writes it, naming ``proc``'s group as the server."""
    ref = ProcessRef.of(proc.pid) if created is None else ProcessRef(proc.pid, created)
    state_path(workspace).write_text(json.dumps({"participants": {"server": ref.to_json()}}))


@pytest.fixture
def sleeper(tmp_path):
    procs = []

    def start() -> subprocess.Popen:
        procs.append(start_group(["sleep", "120"], tmp_path / "sleep.log"))
        return procs[-1]

    yield start
    for proc in procs:
        stop_started(proc, grace=1)


def test_more_sites_than_provisioned(tmp_path):
    with pytest.raises(SecureError, match=r"3 sites asked, but .* has kits for 2 \(site-1, site-2\): add site-3"):
        preflight(3, fake_kits(tmp_path))


def test_kits_from_before_the_site_policies_are_named_with_the_fix(tmp_path):
    """Kits whose allow-list lacks our classes would refuse every job: said before anything starts."""
    workspace = fake_kits(tmp_path)
    (workspace / "site-2" / "local" / "resources.json").unlink()  # NVFlare's default list, as older kits have
    with pytest.raises(SecureError, match=r"site-2/local does not allow spleen_flare.site_executor.*provision again"):
        preflight(2, workspace)


@pytest.mark.parametrize(
    "kit, missing",
    [
        ("site-1", "spleen_flare.ct_statistics.SpleenCTStatistics"),
        ("site-2", "spleen_flare.stats_privacy.CTStatisticsPrivacy"),
        ("localhost", "nvflare.app_common.workflows.statistics_controller.StatisticsController"),
    ],
)
def test_kits_from_before_the_statistics_job_are_named_with_the_class_they_lack(tmp_path, kit, missing):
    """Kits that allow the training jobs' classes but not a later job's: the first class missing is named."""
    workspace = fake_kits(tmp_path)
    resources = workspace / kit / "local" / "resources.json"
    allowed = json.loads(resources.read_text())
    allowed["class_allow_list"].remove(missing)
    resources.write_text(json.dumps(allowed))
    with pytest.raises(SecureError, match=rf"{kit}/local does not allow {re.escape(missing)} .*provision again"):
        preflight(2, workspace)


def test_port_taken(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        workspace = fake_kits(tmp_path, ports=(port, free_port()))
        with pytest.raises(SecureBusyError, match=f"port\\(s\\) {port} on 127.0.0.1 are in use"):
            preflight(2, workspace)


def test_previous_system_still_runs_then_stop_ends_it(tmp_path, sleeper):
    workspace = fake_kits(tmp_path)
    proc = sleeper()
    record(workspace, proc)
    assert running_pids(workspace) == [proc.pid]
    with pytest.raises(SecureBusyError, match=r"still runs \(PIDs .*\); stop it first \(./start_fl_secure.sh --stop\)"):
        preflight(2, workspace)
    with pytest.raises(SecureBusyError, match="stop it first"):
        provision(tmp_path.parent, name=tmp_path.name)
    assert stop_system(workspace, grace=5) == []
    proc.wait(timeout=5)
    assert not state_path(workspace).exists()
    assert preflight(2, workspace).sites.keys() == {"site-1", "site-2"}


def test_stale_state_and_reused_pids_are_not_ours(tmp_path, sleeper):
    workspace = fake_kits(tmp_path)
    dead = sleeper()
    record(workspace, dead)
    dead.kill()
    dead.wait(timeout=5)
    assert running_pids(workspace) == []
    preflight(2, workspace)  # a stale file does not block
    other = sleeper()
    record(workspace, other, created=ProcessRef.of(other.pid).created - 1)  # same PID, another process: never signalled
    assert running_pids(workspace) == []
    assert stop_system(workspace, grace=1) == []
    assert ProcessRef.of(other.pid).alive()


def test_secure_system_is_an_fl_system(tmp_path):
    system = SecureSystem(fake_kits(tmp_path), n_sites=2, env={"SPLEEN_DATA_DIR": "/data"})
    assert isinstance(system, FLSystem)
    assert system.site_names == ["site-1", "site-2"]
    assert system.admin_startup_kit == tmp_path / "admin@nvidia.com"
    assert system.log_paths == {
        "server": tmp_path / "localhost" / "log.txt",
        "site-1": tmp_path / "site-1" / "log.txt",
        "site-2": tmp_path / "site-2" / "log.txt",
    }
    env = system.env()
    assert env["SPLEEN_DATA_DIR"] == "/data" and env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    system.stop()  # never started: stops nothing, no error
