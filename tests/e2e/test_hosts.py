"""Server, sites and admin on hosts of their own (network namespaces on a bridge, names resolved per host), the
server under a DNS name, each site with only its kit and its own data: the local job and the HE job submitted
from the admin's host over TLS complete with full cross-site results, and the server saw each site connect from
that site's own address; a site cut off the network for 20 s mid-job reconnects and the job completes. Needs root
and iproute2 (skips, saying why); namespaces, links and processes are removed afterwards, also on failure."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import wait_finished

from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV
from spleen_flare.resume import HISTORY_FILE
from spleen_tools.data.datalists import make_site_datalists
from spleen_tools.data.synthetic import make_synthetic_dataset
from spleen_tools.flare import FlareError
from spleen_tools.jobs import JobSettings, prepare_job
from spleen_tools.paths import SECURE_PROJECT_YML
from spleen_tools.procs import wait_for
from spleen_tools.run.progress import parse_event
from spleen_tools.systems.hosts import SERVER_NAME, HostSystem, host_project
from spleen_tools.systems.netns import existing_namespaces, unavailable
from spleen_tools.systems.secure_workspace import provision

pytestmark = [pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""), pytest.mark.faults]
SITES = ["site-1", "site-2"]
LOCAL, HE = "spleen_ct_segmentation_local", "spleen_ct_segmentation_he"
CUT_S = 20


def _site_data(root, site: str, seed: int) -> dict[str, str]:
    """A site's own dataset and datalist, in a folder of its own."""
    data = make_synthetic_dataset(root / f"{site}-data", num_train=3, num_test=0, shape=(64, 64, 16), seed=seed)
    datalist = make_site_datalists(data, 1, out_dir=root / f"{site}-data" / "datalists")["site-1"]
    return {DATA_DIR_ENV: str(data), DATALIST_ENV: str(datalist)}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    t0 = time.monotonic()
    kits = provision(root / "provisioning", host_project(SECURE_PROJECT_YML, root / "project.yml"))
    assert (kits / SERVER_NAME / "startup" / "fed_server.json").is_file()  # the server kit is named by its host
    site_env = {site: _site_data(root, site, seed) for seed, site in enumerate(SITES)}
    system = HostSystem(kits, site_env, root / "logs", prefix="sphtest")
    try:
        system.start()
        print(f"hosts up {time.monotonic() - t0:.0f} s after provisioning began")
        yield system, system.admin(root / "admin.log"), root
    finally:
        system.stop()
        assert not [ns for ns in existing_namespaces() if ns.startswith("sphtest")]


def _run(hosts, job: str, rounds: int, during=None, resume_from: str | None = None) -> dict:
    """Submit ``job`` from the admin's host; ``during(job_id)`` runs while it does; its cross-site results."""
    system, admin, root = hosts
    settings = JobSettings(
        rounds=rounds, local_epochs=1, min_clients=2, quick=True, tracking="workspace", resume_from=resume_from
    )
    job_id = admin.submit(prepare_job(job, root / f"jobs-{job}-{rounds}-{resume_from}", settings))
    if during:
        during(job_id)
    assert wait_finished(admin, job_id, 600) == "FINISHED:COMPLETED", job
    results = next(admin.download(job_id, root / "download" / job_id).rglob("cross_val_results.json"))
    _run.job_id = job_id
    return json.loads(results.read_text())


@pytest.mark.parametrize("job", [LOCAL, HE])
def test_jobs_run_with_every_participant_on_its_own_host(hosts, job):
    system = hosts[0]
    assert system.joined() == {s: system.network.hosts[s].address for s in SITES}  # each from its own host
    t0 = time.monotonic()
    cross = _run(hosts, job, rounds=1)
    assert sorted(cross) == SITES and all(len(models) >= 3 for models in cross.values()), cross
    print(f"{job} on namespaced hosts: {time.monotonic() - t0:.0f} s")


def test_a_site_cannot_read_another_sites_data(hosts):
    system = hosts[0]
    theirs = system.data_roots["site-2"]
    image = next(theirs.rglob("imagesTr/*.nii.gz"))

    def on_host(site: str, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(system.site_command(site, cmd), capture_output=True, text=True, timeout=30)

    assert on_host("site-2", ["test", "-f", str(image)]).returncode == 0  # its own data
    assert on_host("site-1", ["ls", "-A", str(theirs)]).stdout == ""  # another site's folder: empty
    assert on_host("site-1", ["test", "-f", str(image)]).returncode != 0
    site1 = system.kits.sites["site-1"]  # the running site-1 sees the same (its process's mount namespace)
    pid = next(p for p in system.network.pids("site-1") if "client_train" in Path(f"/proc/{p}/cmdline").read_text())
    assert not Path(f"/proc/{pid}/root{image}").exists() and site1.is_dir()


def test_a_site_cut_off_for_20_s_reconnects_and_the_job_completes(hosts):
    system = hosts[0]

    def cut_after_first_round(job_id: str) -> None:
        log = system.kits.sites["site-2"] / job_id / "log.txt"

        def trained() -> bool:
            lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
            return any((e := parse_event(x)) and e["kind"] == "round" for x in lines)

        wait_for(trained, 300, "site-2's first round")
        system.network.link("site-2", up=False)
        time.sleep(CUT_S)
        system.network.link("site-2", up=True)
        cut_after_first_round.back = time.monotonic()

    cross = _run(hosts, LOCAL, rounds=3, during=cut_after_first_round)
    assert sorted(cross) == SITES, cross  # site-2 came back and took part to the end
    print(f"site-2 cut off {CUT_S} s; job completed {time.monotonic() - cut_after_first_round.back:.0f} s after")


def test_the_he_job_resumes_after_the_server_host_restarts_its_server(hosts):
    """The server process killed once it persisted round 0's (encrypted) global model: its restart loop brings it
    back without the job, and the job submitted again with ``resume_from`` (the deployment guide's commands) goes
    on from that model: rounds 1.. run once, the history is continuous."""
    system, admin, root = hosts
    server_kit = system.kits.server
    lost: dict = {}

    def kill_the_server_after_round_0(job_id: str) -> None:
        app = server_kit / job_id / "app_server"

        def persisted() -> bool:
            history = json.loads((app / HISTORY_FILE).read_text()) if (app / HISTORY_FILE).is_file() else []
            return any(e.get("round") == 0 for e in history) and (app / "FL_global_model.pt").is_file()

        wait_for(persisted, 300, "the server's round-0 global model", interval=0.05)
        server = next(p for p in system.network.pids("server") if "server_train" in _cmdline(p))
        for pid in [*_children(server), server]:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        lost.update(job=job_id, at=time.monotonic())
        wait_for(lambda: _answers(admin), 120, "the restarted server to answer")
        lost["back_s"] = time.monotonic() - lost["at"]
        raise _Lost()

    with pytest.raises(_Lost):
        _run(hosts, HE, rounds=2, during=kill_the_server_after_round_0)
    assert admin.status(lost["job"]) == "RUNNING"  # NVFlare 2.9: the restarted server forgot it, the store did not
    t0 = time.monotonic()
    cross = _run(hosts, HE, rounds=2, resume_from=lost["job"])
    assert sorted(cross) == SITES and all(len(models) >= 3 for models in cross.values()), cross
    history = json.loads(next((root / "download" / _run.job_id).rglob(HISTORY_FILE)).read_text())
    models = [e for e in history if "sha256" in e and not e.get("best")]
    assert [e["round"] for e in models] == ["initial", 0, 1], history
    assert all(e.get("encrypted") for e in models[1:]), history  # the server only ever held ciphertext
    took = time.monotonic() - t0
    print(f"server killed: back in {lost['back_s']:.0f} s; the resumed HE job completed in {took:.0f} s")


class _Lost(Exception):
    pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def _answers(admin) -> bool:
    try:
        admin("job", "list", timeout=30)
        return True
    except (FlareError, subprocess.TimeoutExpired):
        return False
