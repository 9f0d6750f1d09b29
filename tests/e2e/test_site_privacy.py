"""The POC kits as the one command prepares them, on a real HE POC (``nvflare poc prepare -he``): the server
listens on loopback only, and sites whose own ``local/privacy.json`` says "encrypt what leaves, keep the local
model at home" are sent the *plain* FedAvg job. Each site encrypts its update all the same, so the server's
plaintext aggregator gets nothing it can read and the global model never moves. Their policy also sets a minimum
of 3 cases for statistics: sent the statistics job with the job's own minimum lowered to 1, each site (2 cases)
still sends its counts only."""

from __future__ import annotations

import json

import psutil
import pytest
from conftest import wait_finished

from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV, HE_TAG, read_tagged_line
from spleen_tools.data.datalists import make_site_datalists
from spleen_tools.data.synthetic import make_synthetic_dataset
from spleen_tools.flare import TERMINAL_OK, JobAdmin
from spleen_tools.jobs import STATS_JOB, JobSettings, prepare_job
from spleen_tools.run.stats_report import find_stats, load_stats
from spleen_tools.systems.poc import PocSystem
from spleen_tools.systems.site_policy import SitePolicy, kit_policy

pytestmark = pytest.mark.he


def _he_lines(log: str) -> list[dict]:
    found = [read_tagged_line(line) for line in log.splitlines() if HE_TAG in line]
    return [fields for tag_fields in found if tag_fields for tag, fields in [tag_fields] if tag == HE_TAG]


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("site_privacy")
    data = make_synthetic_dataset(tmp_path / "data", num_train=4, num_test=0, shape=(64, 64, 16))
    make_site_datalists(data, 2, out_dir=tmp_path / "datalists")
    env = {DATA_DIR_ENV: str(data), DATALIST_ENV: str(tmp_path / "datalists" / "{site}.json")}
    policy = SitePolicy(encrypt_results=True, keep_local_model=True, stats_min_count=3)
    with PocSystem(tmp_path / "poc", 2, he=True, env=env, policy=policy) as system:
        yield system, tmp_path


def test_the_poc_server_listens_on_loopback_only(poc):
    """NVFlare 2.9 listens on every interface unless the server's host is a loopback address (POC's is "server")."""
    system, _ = poc
    server = psutil.Process(system.processes["server"].pid)
    listening = {c.laddr for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}, listening


def test_a_plain_job_sent_to_sites_that_encrypt_leaves_no_plaintext_weights(poc):
    system, tmp_path = poc
    for site in system.site_names:
        assert kit_policy(system.prod_dir / site)["privacy_filters"] == [
            "spleen_flare.site_filters.SiteHEDecryptor",
            "spleen_flare.stats_privacy.CTStatisticsPrivacy",
            "spleen_flare.site_filters.KeepLocalModel",
            "spleen_flare.site_filters.SiteHEEncryptor",
        ]
    admin = JobAdmin(system.admin_startup_kit, system.env(), tmp_path / "admin.log")
    settings = JobSettings(rounds=1, local_epochs=1, quick=True, tracking="workspace", site_timeout=120)
    job_id = admin.submit(prepare_job("spleen_ct_segmentation_local", tmp_path / "jobs", settings))
    wait_finished(admin, job_id, timeout=600)
    sites = {s: (system.prod_dir / s / job_id / "log.txt").read_text(errors="replace") for s in system.site_names}
    # every site trained, and what it sent for "train" left encrypted under its policy, not the job's
    for site, log in sites.items():
        encrypted = [f for f in _he_lines(log) if f.get("stage") == "encrypt" and f.get("task") == "train"]
        assert encrypted and encrypted[0]["side"] == site and encrypted[0]["ciphertexts"] > 0, log[-3000:]
        assert "local model kept at the site" in log
    # the plain server got no weights it could add: it refused both updates, the global model never changed
    server = admin.download(job_id, tmp_path / "download") / job_id / "workspace"
    assert "[spleen-he]" not in (server / "log.txt").read_text(errors="replace"), "the plain server runs no HE"
    history = json.loads(next(server.rglob("global_model_history.json")).read_text())
    digests = {e["sha256"] for e in history if "sha256" in e}
    assert len(digests) == 1, history  # only the initial model: nothing was aggregated


def test_a_site_sends_no_statistics_its_own_policy_withholds_whatever_the_job_says(poc):
    system, tmp_path = poc
    admin = JobAdmin(system.admin_startup_kit, system.env(), tmp_path / "admin_stats.log")
    job = prepare_job(STATS_JOB, tmp_path / "stats_jobs", JobSettings(min_clients=2, stats_min_count=1))
    job_id = admin.submit(job)
    assert wait_finished(admin, job_id, timeout=300) in TERMINAL_OK
    stats = load_stats(find_stats(admin.download(job_id, tmp_path / "stats_download")))
    for feature, dataset in (("spleen_hu", "intensity"), ("spleen_volume_ml", "cases"), ("size_z", "cases")):
        assert {site: stats[feature]["count"][site][dataset] for site in system.site_names} == dict.fromkeys(
            system.site_names, 2
        )
        for statistic in ("sum", "mean", "histogram"):
            assert not set(system.site_names) & set(stats[feature].get(statistic, {})), (feature, statistic)
