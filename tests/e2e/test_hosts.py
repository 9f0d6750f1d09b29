"""Server, sites and admin on hosts of their own (network namespaces on a bridge, names resolved per host), the
server under a DNS name, each site with only its kit and its own data: the local job and the HE job submitted
from the admin's host over TLS complete with full cross-site results, and the server saw each site connect from
that site's own address. Needs root and iproute2 (skips, saying why); namespaces, links and processes are
removed afterwards, also on failure."""

from __future__ import annotations

import json
import time

import pytest
from conftest import wait_finished

from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV
from spleen_tools.data.datalists import make_site_datalists
from spleen_tools.data.synthetic import make_synthetic_dataset
from spleen_tools.jobs import JobSettings, prepare_job
from spleen_tools.paths import SECURE_PROJECT_YML
from spleen_tools.systems.hosts import SERVER_NAME, HostSystem, host_project
from spleen_tools.systems.netns import existing_namespaces, unavailable
from spleen_tools.systems.secure_workspace import provision

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
SITES = ["site-1", "site-2"]
JOBS = ["spleen_ct_segmentation_local", "spleen_ct_segmentation_he"]


def _site_data(root, site: str, seed: int) -> dict[str, str]:
    """A site's own dataset and datalist, in a folder of its own."""
    data = make_synthetic_dataset(root / f"{site}-data", num_train=3, num_test=0, shape=(64, 64, 16), seed=seed)
    datalist = make_site_datalists(data, 1, out_dir=root / f"{site}-data" / "datalists")["site-1"]
    return {DATA_DIR_ENV: str(data), DATALIST_ENV: str(datalist)}


def test_jobs_run_with_every_participant_on_its_own_host(tmp_path):
    t0 = time.monotonic()
    kits = provision(tmp_path / "provisioning", host_project(SECURE_PROJECT_YML, tmp_path / "project.yml"))
    assert (kits / SERVER_NAME / "startup" / "fed_server.json").is_file()  # the server kit is named by its host
    site_env = {site: _site_data(tmp_path, site, seed) for seed, site in enumerate(SITES)}
    system = HostSystem(kits, site_env, tmp_path / "logs", prefix="sphtest")
    try:
        system.start()
        joined = system.joined()
        assert joined == {s: system.network.hosts[s].address for s in SITES}, joined  # each from its own host
        admin = system.admin(tmp_path / "admin.log")
        for job in JOBS:
            settings = JobSettings(rounds=1, local_epochs=1, min_clients=2, quick=True, tracking="workspace")
            job_id = admin.submit(prepare_job(job, tmp_path / "jobs", settings))
            status = wait_finished(admin, job_id, 600)
            assert status == "FINISHED:COMPLETED", (job, status)
            results = next(admin.download(job_id, tmp_path / "download" / job).rglob("cross_val_results.json"))
            cross = json.loads(results.read_text())
            assert sorted(cross) == SITES and all(len(models) >= 3 for models in cross.values()), (job, cross)
    finally:
        system.stop()
    assert not [ns for ns in existing_namespaces() if ns.startswith("sphtest")]
    print(f"multi-host test: {time.monotonic() - t0:.0f} s (provision, start, local job, HE job, stop)")
