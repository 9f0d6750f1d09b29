"""Fast tests of the secure system's helpers: CLI input, one-line errors naming the fix, provisioning, stopping."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spleen_fl.cli import run_experiment as run_cli
from spleen_fl.cli import secure as cli
from spleen_fl.fl_system import FLSystem
from spleen_fl.poc import pid_alive
from spleen_fl.procs import free_port, start_group, wait_for
from spleen_fl.secure import (
    PROJECT_YML,
    NotProvisionedError,
    SecureBusyError,
    SecureError,
    SecureSystem,
    isolate_server_storage,
    preflight,
    provision,
    read_kits,
    running_pids,
    start_time,
    state_path,
    stop_system,
    terminate,
)


def fake_kits(root: Path, sites: int = 2, ports: tuple[int, int] | None = None) -> Path:
    """The files read_kits() looks at, as nvflare provision lays them out (no certificates: nothing starts)."""
    fl_port, admin_port = ports or (free_port(), free_port())
    server = {"servers": [{"service": {"target": f"localhost:{fl_port}"}, "admin_port": admin_port}]}
    files = {
        "localhost/startup/fed_server.json": server,
        "admin@nvidia.com/startup/fed_admin.json": {"admin": {"username": "admin@nvidia.com"}},
        **{f"site-{i}/startup/fed_client.json": {} for i in range(1, sites + 1)},
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(content))
    return root


def record(workspace: Path, proc: subprocess.Popen, start: int | None = None) -> None:
    """A system.json as SecureSystem.start() writes it, naming ``proc``'s group as the server."""
    entry = {"pgid": proc.pid, "start_time": start_time(proc.pid) if start is None else start}
    state_path(workspace).write_text(json.dumps({"participants": {"server": entry}}))


@pytest.fixture
def sleeper(tmp_path):
    procs = []

    def start() -> subprocess.Popen:
        procs.append(start_group(["sleep", "120"], tmp_path / "sleep.log"))
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=5)


# -- command line ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["2"], ["start", "2"]),
        (["3", "--data", "d"], ["start", "3", "--data", "d"]),
        (["--stop"], ["stop"]),
        (["--status", "--workspace", "w"], ["status", "--workspace", "w"]),
        (["provision"], ["provision"]),
    ],
)
def test_cli_shorthands(argv, expected):
    assert cli.normalize(argv) == expected


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["0"], "must be at least 1"),
        (["start", "two"], "expected a number of sites"),
        (["launch"], "invalid choice"),
        (["2", "--no-such-option"], "unrecognized arguments"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_cli_without_arguments_asks_for_n(capsys):
    assert cli.main([]) == 2
    assert "give the number of sites (./start_fl_secure.sh 2)" in capsys.readouterr().out


def test_cli_not_provisioned_names_the_fix(tmp_path, capsys):
    assert cli.main(["2", "--workspace", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "provision it first (./start_fl_secure.sh provision)" in err, err


def test_cli_stop_with_nothing_running(tmp_path, capsys):
    assert cli.main(["--stop", "--workspace", str(fake_kits(tmp_path))]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_run_experiment_secure_not_provisioned_is_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPLEEN_SECURE_WORKSPACE", str(tmp_path / "nothing"))
    assert run_cli.main(["--secure", "--quick", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "provision it first (./start_fl_secure.sh provision)" in err, err
    assert not (Path(tmp_path / "runs" / "latest") / "mlflow").exists(), "no MLflow started before the check"


# -- one-line errors ------------------------------------------------------------------------------------------
def test_empty_folder_is_not_provisioned(tmp_path):
    with pytest.raises(NotProvisionedError, match="not a provisioned secure workspace"):
        read_kits(tmp_path)


def test_more_sites_than_provisioned(tmp_path):
    with pytest.raises(SecureError, match=r"3 sites asked, but .* has kits for 2 \(site-1, site-2\): add site-3"):
        preflight(3, fake_kits(tmp_path))


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
    dead.kill()
    dead.wait(timeout=5)
    record(workspace, dead)
    assert running_pids(workspace) == []
    preflight(2, workspace)  # a stale file does not block
    other = sleeper()
    record(workspace, other, start=start_time(other.pid) - 1)  # same PID, another process: never signalled
    assert running_pids(workspace) == []
    assert stop_system(workspace, grace=1) == []
    assert pid_alive(other.pid)


def test_terminate_reaches_job_processes_in_their_own_session(tmp_path):
    """NVFlare starts jobs with setsid: a group kill alone would miss them."""
    child_file = tmp_path / "child.pid"
    proc = start_group(["bash", "-c", f"setsid sleep 120 & echo $! > {child_file}; sleep 120"], tmp_path / "log")
    wait_for(lambda: child_file.is_file() and child_file.read_text().strip() != "", 10, "child started")
    child = int(child_file.read_text())
    assert pid_alive(child)
    assert terminate([proc.pid], grace=5) == []
    proc.wait(timeout=5)
    assert not pid_alive(child) and not pid_alive(proc.pid)


# -- provisioning and the system object -----------------------------------------------------------------------
def test_provision_places_the_newest_kits_and_replaces_atomically(tmp_path):
    target = provision(tmp_path, PROJECT_YML)
    kits = read_kits(target)
    assert target == tmp_path / "secure_workspace"
    assert list(kits.sites) == ["site-1", "site-2"] and kits.server.name == "localhost"
    assert (kits.fl_port, kits.admin_port, kits.admin_user) == (8102, 8103, "admin@nvidia.com")
    for kit in (kits.server, *kits.sites.values(), kits.admin):
        assert (kit / "startup" / "rootCA.pem").is_file()
    assert (kits.server / "startup" / "server_context.tenseal").is_file()  # HEBuilder: public context only
    assert (kits.sites["site-1"] / "startup" / "client_context.tenseal").is_file()
    (target / "marker").write_text("old")
    provision(tmp_path, PROJECT_YML)
    assert not (target / "marker").exists()
    newest = tmp_path / "workspace" / "secure_project" / "prod_01"
    crt = "localhost/startup/server.crt"
    assert (target / crt).read_bytes() == (newest / crt).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secure_workspace", "workspace"], "no temporary leftovers"


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


def test_server_storage_moves_out_of_the_shared_tmp(tmp_path):
    """NVFlare's default job store /tmp/nvflare/jobs-storage would be shared by every provisioned server."""
    kits = read_kits(provision(tmp_path, PROJECT_YML))
    default = kits.server / "local" / "resources.json.default"
    before = default.read_text()
    written = isolate_server_storage(kits.server)
    assert written == kits.server / "local" / "resources.json" and default.read_text() == before
    text = written.read_text()
    assert "/tmp/nvflare" not in text
    assert str(kits.server / "storage" / "jobs") in text and str(kits.server / "storage" / "snapshot") in text
    written.write_text("{}")  # the user's own file is left alone
    isolate_server_storage(kits.server)
    assert written.read_text() == "{}"
