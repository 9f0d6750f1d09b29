"""The provisioned secure system on real NVFlare processes: start_fl_secure.sh, mutual TLS, foreign kits, --stop,
and the one command with --secure.

A temporary copy of ``workspaces/secure_project.yml`` with one more site (``site-3``) is provisioned twice into
two folders: the first is the system under test (``start_fl_secure.sh 2`` starts site-1 and site-2); the second,
a separate provisioning with its own root CA, gives the "foreign" kits. So the foreign site-3 has a name our
provisioning knows too: only its certificates differ. Ports 8102/8103 (fixed by the project) must be free.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, SITES, assert_nothing_left, runner_cmd, wait_finished

from spleen_tools import flare
from spleen_tools.flare import JobAdmin
from spleen_tools.job_result import GLOBAL_MODEL
from spleen_tools.jobs import JobSettings, prepare_job
from spleen_tools.paths import NVFLARE, SECURE_PROJECT_YML
from spleen_tools.procs import ProcessRef, start_group, terminate, wait_for
from spleen_tools.systems.base import participant_env
from spleen_tools.systems.secure import stop_system
from spleen_tools.systems.secure_workspace import provision, read_kits, running_pids, state_path

# aiohttp, inside NVFlare's admin client (used in-process for connected_sites).
pytestmark = pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning")


def connected_sites(kits) -> list[str]:
    return flare.connected_sites(kits.admin_user, kits.admin)


def _secure_cmd(*args: str) -> list[str]:
    return ["bash", str(REPO_ROOT / "start_fl_secure.sh"), *args]


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("secure")
    project = yaml.safe_load(SECURE_PROJECT_YML.read_text())
    admin_at = next(i for i, p in enumerate(project["participants"]) if p["type"] == "admin")
    project["participants"].insert(admin_at, {"name": "site-3", "type": "client", "org": "nvidia"})
    yml = root / "secure_project.yml"
    yml.write_text(yaml.safe_dump(project, sort_keys=False))
    ours = provision(root / "ours", yml)
    # A server that accepts code (NVFlare's default policy): the sites must refuse such jobs on their own.
    (ours / "localhost" / "local" / "authorization.json").unlink()
    foreign = provision(root / "foreign", yml)
    assert (ours / "localhost/startup/rootCA.pem").read_bytes() != (
        foreign / "localhost/startup/rootCA.pem"
    ).read_bytes()
    return {"ours": ours, "foreign": foreign, "root": root}


@pytest.fixture(scope="module")
def running(workspaces):
    """``start_fl_secure.sh 2`` on our workspace; whatever the tests do, everything is stopped at the end."""
    ws = workspaces["ours"]
    t0 = time.monotonic()
    proc = subprocess.run(
        _secure_cmd("2", "--workspace", str(ws), "--timeout", "400"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=500,
    )
    seconds = time.monotonic() - t0
    try:
        yield {"proc": proc, "seconds": seconds, "workspace": ws, "kits": read_kits(ws)}
    finally:
        assert stop_system(ws, grace=10) == []


def _output(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


def test_start_fl_secure_brings_up_server_and_sites(running):
    proc, ws, kits = running["proc"], running["workspace"], running["kits"]
    assert proc.returncode == 0, _output(proc)
    out = proc.stdout
    for name, kit in (("server", kits.server), ("site-1", kits.sites["site-1"]), ("site-2", kits.sites["site-2"])):
        assert f"  {name}: {kit / 'log.txt'}; {ws / 'logs' / f'{name}.console.log'}" in out, out
    assert "stop: ./start_fl_secure.sh --stop" in out
    assert connected_sites(kits) == SITES  # site-3 is provisioned but was not asked for
    state = json.loads(state_path(ws).read_text())
    assert sorted(state["participants"]) == ["server", *SITES]
    assert all(ProcessRef.from_json(rec).alive() for rec in state["participants"].values())
    # The participants talk TLS: the server log names each site's SSL connection.
    server_log = (kits.server / "log.txt").read_text()
    assert all(f"SSL {site}]" in server_log for site in SITES), server_log[-2000:]


def test_second_start_is_refused_while_running(running):
    proc = subprocess.run(
        _secure_cmd("2", "--workspace", str(running["workspace"])),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "still runs" in proc.stderr and "./start_fl_secure.sh --stop" in proc.stderr, _output(proc)


def _tls_exchange(port: int, ca: Path, cert: Path, key: Path) -> bytes | str:
    """Connect trusting ``ca`` and presenting ``cert``; send one HTTP request; the reply bytes or the TLS error."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                return conn.recv(64)
        except (ssl.SSLError, ConnectionError) as err:
            return f"{type(err).__name__}: {err}"


def test_server_refuses_foreign_certificates(running, workspaces):
    """Trusting our CA (so the client side is satisfied), a foreign certificate is cut off by the server, on the FL
    port (a site) and on the admin port (an admin); our own certificates get an HTTP answer."""
    kits, foreign = running["kits"], read_kits(workspaces["foreign"])
    ca = kits.server / "startup" / "rootCA.pem"
    cases = {
        "our site-1": (kits.fl_port, kits.sites["site-1"], True),
        "foreign site-3": (kits.fl_port, foreign.sites["site-3"], False),
        "our admin": (kits.admin_port, kits.admin, True),
        "foreign admin": (kits.admin_port, foreign.admin, False),
    }
    for what, (port, kit, accepted) in cases.items():
        reply = _tls_exchange(port, ca, kit / "startup" / "client.crt", kit / "startup" / "client.key")
        got_http = isinstance(reply, bytes) and reply.startswith(b"HTTP/")
        assert got_http == accepted, (what, reply)


def test_site_with_foreign_certificates_is_refused(running, workspaces, tmp_path):
    """The foreign provisioning's site-3, started from its own kit, never shows up at our server."""
    kits = running["kits"]
    foreign_kit = tmp_path / "site-3"
    shutil.copytree(workspaces["foreign"] / "site-3", foreign_kit)
    proc = start_group(
        ["bash", str(foreign_kit / "startup" / "sub_start.sh")], tmp_path / "site-3.console.log", env=participant_env()
    )
    ref = ProcessRef.of(proc.pid)
    try:
        log = foreign_kit / "log.txt"
        deadline = time.monotonic() + 180
        refused = False
        while time.monotonic() < deadline and not refused:
            assert "site-3" not in connected_sites(kits)
            refused = log.is_file() and "CERTIFICATE_VERIFY_FAILED" in log.read_text()
            time.sleep(2)
        assert refused, f"no TLS failure in {log} within 180 s"
        # It keeps retrying; give it a few more attempts (it retries every few seconds): still not connected.
        for _ in range(5):
            time.sleep(3)
            assert connected_sites(kits) == SITES
    finally:
        assert terminate([ref], grace=10) == []
        proc.wait(timeout=10)
    assert not ref.alive()


def test_admin_without_a_valid_kit_cannot_submit(running, workspaces, tmp_path):
    kits = running["kits"]
    job = prepare_job("spleen_ct_segmentation_local", tmp_path / "jobs", JobSettings(rounds=1, local_epochs=1))
    no_certs = tmp_path / "admin_without_certs"
    shutil.copytree(kits.admin, no_certs)
    (no_certs / "startup" / "client.crt").unlink()
    (no_certs / "startup" / "client.key").unlink()
    attempts = {"foreign admin kit": read_kits(workspaces["foreign"]).admin, "kit without its certificates": no_certs}
    for what, kit in attempts.items():
        proc = subprocess.run(
            [str(NVFLARE), "--format", "json", "job", "submit", "-j", str(job), "--startup-kit", str(kit)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
        assert proc.returncode != 0 and reply["status"] == "error", (what, proc.stdout, proc.stderr)
        assert reply["error_code"] in ("CONNECTION_FAILED", "STARTUP_KIT_MISSING"), (what, reply)
    with pytest.raises(Exception, match="(?i)connect"):
        connected_sites(read_kits(workspaces["foreign"]))
    # Our own kit works, and sees that nothing was submitted.
    listed = subprocess.run(
        [str(NVFLARE), "--format", "json", "job", "list", "--startup-kit", str(kits.admin)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    reply = json.loads(listed.stdout.strip().splitlines()[-1])
    assert listed.returncode == 0 and reply["status"] == "ok" and reply["data"] == [], listed.stdout


def _job_outcome(kits, job: Path, log: Path, timeout: float = 300.0) -> tuple[str, str]:
    """Submit ``job`` with the admin kit and wait until it is finished: (job id, final status)."""
    admin = JobAdmin(kits.admin, participant_env(), log)
    job_id = admin.submit(job)
    return job_id, wait_finished(admin, job_id, timeout)


def _site_job_log(kits, site: str, job_id: str) -> str:
    log = kits.sites[site] / job_id / "log.txt"
    return log.read_text(errors="replace") if log.is_file() else ""


def test_a_job_with_code_never_runs_on_a_site(running, tmp_path):
    """A job that carries code (app/custom: bring-your-own-code) is refused by each site's own authorization policy
    with NVFlare's refusal, before anything of it runs; the server here accepts code (NVFlare's default policy,
    see ``workspaces``), so the refusal is the sites' own."""
    kits = running["kits"]
    marker = tmp_path / "custom_code_ran"
    job = prepare_job("spleen_ct_segmentation_local", tmp_path / "jobs", JobSettings(rounds=1, ship_code=True))
    custom = job / "app" / "custom" / "spleen_flare" / "__init__.py"
    custom.write_text(custom.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    job_id, status = _job_outcome(kits, job, tmp_path / "admin.log")
    assert status.startswith("FINISHED") and status != "FINISHED:COMPLETED", status
    server_log = (kits.server / "log.txt").read_text(errors="replace")
    refused = [line for line in server_log.splitlines() if job_id in line and "deploy failure" in line]
    assert refused and "'server: OK'" in refused[0], server_log[-3000:]
    for site in SITES:
        assert f"'{site}: NVFLARE_ERROR: BYOC not permitted'" in refused[0], refused
        assert not (kits.sites[site] / job_id).exists(), "a site kept the job's folder"
    assert not marker.exists(), "the job's own code ran somewhere"


def test_a_job_naming_a_class_outside_the_allow_list_is_refused(running, tmp_path):
    """No code in the job, but NVFlare's ClientAPIExecutor, which would run any command: not in a site's
    class_allow_list, so the site refuses to build it and the command never runs."""
    kits = running["kits"]
    marker = tmp_path / "command_ran"
    job = prepare_job("spleen_ct_segmentation_local", tmp_path / "jobs", JobSettings(rounds=1))
    client_json = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_json.read_text())
    client["executors"][0]["executor"] = {
        "path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
        "args": {"execution_mode": "external_process", "command": f"touch {marker}"},
    }
    client_json.write_text(json.dumps(client))
    job_id, status = _job_outcome(kits, job, tmp_path / "admin.log")
    assert status != "FINISHED:COMPLETED", status
    refusal = "Component 'nvflare.app_common.executors.client_api_executor.ClientAPIExecutor' at config path"
    for site in SITES:  # the site's job process writes its log as it ends, maybe after the server's status
        wait_for(lambda s=site: "is not in allow_list" in _site_job_log(kits, s, job_id), 60, f"{site}'s refusal")
        assert refusal in _site_job_log(kits, site, job_id)
    assert not marker.exists()


def test_stop_ends_everything_it_started(running):
    ws = running["workspace"]
    before = [ProcessRef.of(pid) for pid in running_pids(ws)]
    assert len(before) >= 6, before  # 3 restart loops, 3 python participants (plus their sleeps)
    proc = subprocess.run(
        _secure_cmd("--stop", "--workspace", str(ws)), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "stopped the secure system" in proc.stdout, _output(proc)
    assert [ref for ref in before if ref.alive()] == []
    assert not state_path(ws).exists() and running_pids(ws) == []


def test_local_job_runs_over_tls_end_to_end(workspaces, tmp_path):
    """``run_experiment --secure``: its own SecureSystem on the provisioned kits, 1 round, results, nothing left."""
    ws = workspaces["ours"]
    assert running_pids(ws) == [], "test_stop_ends_everything_it_started stops start_fl_secure.sh's system first"
    runs_dir = tmp_path / "runs"
    t0 = time.monotonic()
    proc = subprocess.run(
        runner_cmd(runs_dir, "--secure", "--rounds", "1", "--timeout", "800"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONUNBUFFERED="1", SPLEEN_SECURE_WORKSPACE=str(ws)),
    )
    seconds = time.monotonic() - t0
    run_dir = (runs_dir / "latest").resolve()
    assert proc.returncode == 0, _output(proc)
    assert "starting the FL system (secure, 2 sites)" in proc.stdout
    assert "round 1/1 done" in proc.stdout and "cross-site validation (Dice" in proc.stdout
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "FINISHED:COMPLETED" and s["sites"] == SITES and s["rounds"] == 1
    assert len(s["round_times_s"]) == 1 and 0 < s["round_times_s"][0] < s["wall_time_s"] < seconds + 1
    assert len(s["fl_round_s"]) == 1 and 0 < s["site_work_s"][0] < s["fl_round_s"][0]  # the server's log, over TLS
    cross = s["cross_site"]
    assert {GLOBAL_MODEL, *SITES} <= set(cross), sorted(cross)
    for model, by_site in cross.items():
        assert sorted(by_site) == SITES and all(0.0 <= d <= 1.0 for d in by_site.values()), (model, by_site)
    assert s["final_global_dice"] == cross[GLOBAL_MODEL]
    assert s["paths"]["log_site-1"] == str(ws / "site-1")
    assert (ws / "site-1" / s["job_id"] / "log.txt").is_file()
    assert (ws / "localhost" / "storage" / "jobs" / s["job_id"]).is_dir(), "the job store is the workspace's own"
    assert (run_dir / "job_result" / s["job_id"]).is_dir()
    # The run stopped everything it started: its process groups, MLflow, and the secure system's state file.
    assert running_pids(ws) == [] and not state_path(ws).exists()
    assert_nothing_left(run_dir, ws)
    assert json.loads((run_dir / "pids.json").read_text())["secure"]["workspace"] == str(ws)


def test_he_job_over_tls_leaves_no_secret_behind(workspaces, tmp_path):
    """``run_experiment --secure --job he``: HE over TLS with the signed kit fingerprint; the run's own scan finds no
    kit secret in the run directory (MLflow store, downloaded job, bundle) or the participants' logs and job folders,
    and the same scan from the command line flags a secret context that someone copied into the downloaded job."""
    ws = workspaces["ours"]
    assert running_pids(ws) == []
    runs_dir = tmp_path / "runs"
    proc = subprocess.run(
        runner_cmd(runs_dir, "--secure", "--job", "he", "--rounds", "1", "--synthetic-cases", "4", "--timeout", "800"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONUNBUFFERED="1", SPLEEN_SECURE_WORKSPACE=str(ws)),
    )
    run_dir = (runs_dir / "latest").resolve()
    assert proc.returncode == 0, _output(proc)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "FINISHED:COMPLETED" and s["update_bytes_ratio"] <= 2.1
    scan = s["secrets_scan"]
    assert scan["findings"] == [] and scan["secrets"] >= 5, scan  # 4 kit keys + root CA + the sites' HE context
    assert "secrets: none of the kits'" in proc.stdout
    # the server kit holds the public context only; every site kit the signed fingerprint of that context
    import tenseal as ts

    from spleen_flare.he.fingerprint import KEY_FINGERPRINT_FILE, read_fingerprint_file
    from spleen_flare.he.packing import key_fingerprint

    server_kit = ws / "localhost" / "startup"
    assert not (server_kit / "client_context.tenseal").exists()
    server_ctx = ts.context_from((server_kit / "server_context.tenseal").read_bytes())
    assert not server_ctx.is_private()
    for site in SITES:
        assert read_fingerprint_file(ws / site / "startup" / KEY_FINGERPRINT_FILE) == key_fingerprint(server_ctx)

    cli = [sys.executable, "-m", "spleen_tools.cli.scan_secrets", str(run_dir), str(ws), "--kits", str(ws)]
    clean = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0 and "no secrets found" in clean.stdout, clean.stdout + clean.stderr
    leaked = run_dir / "job_result" / s["job_id"] / "site-1_context_backup.bin"
    shutil.copy(ws / "site-1" / "startup" / "client_context.tenseal", leaked)
    found = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert found.returncode == 1 and f"error: {leaked}:" in found.stderr, found.stdout + found.stderr
    assert running_pids(ws) == []
    assert_nothing_left(run_dir, ws)
