"""Faults injected into real processes, each with a defined outcome (marked ``faults``).

A site killed mid-run (its host gone: the site's restart loop, its client and the job process, SIGKILL). NVFlare
alone waits for it: it drops a client only after its 600 s heartbeat timeout plus a 60 s watch, then goes on
with fewer results than ``min_clients``. Our jobs bound every wait for a site (``--site-timeout``) and our
ScatterAndGather names the silent site and stops the job when fewer than ``min_clients`` answered:
- ``min_clients`` met by the others: the job goes on and completes without waiting for it again (final validation,
  cross-site evaluation); the one command says which site dropped, when;
- not met: the job ends within the site timeout with the reason in the server log;
- the site, started again from its kit, rejoins the next job, which completes with every site.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
from conftest import FollowedRun, assert_nothing_left, runner_cmd, wait_finished

from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV
from spleen_tools.data.datalists import make_site_datalists
from spleen_tools.data.synthetic import make_synthetic_dataset
from spleen_tools.flare import JobAdmin
from spleen_tools.jobs import JobSettings, prepare_job
from spleen_tools.procs import wait_for
from spleen_tools.run.progress import LogFollower, parse_event
from spleen_tools.systems.poc import PocSystem

pytestmark = pytest.mark.faults
LOCAL_JOB = "spleen_ct_segmentation_local"


def kill_site(processes: dict, site: str) -> list[int]:
    """SIGKILL a POC site as a host crash would: its restart loop, its client and the client's job process."""
    victims = []
    for key in (f"{site}_daemon", site):
        ref = processes[key]
        pid = ref["pid"] if isinstance(ref, dict) else ref.pid
        try:
            process = psutil.Process(pid)
            victims += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    return [v.pid for v in victims]


def wait_until_accepted(run_dir: Path, job_id: str, site: str, rnd: int, timeout: float = 60.0) -> None:
    """Until the server's job log says the aggregator accepted ``site``'s result of round ``rnd`` (0-based): the
    site is then past its upload, and a kill cannot cut one off."""
    line = f"Contribution from {site} ACCEPTED by the aggregator at round {rnd}."

    def accepted() -> bool:
        logs = list(run_dir.glob(f"poc/*/prod_00/server/{job_id}/log.txt"))
        return bool(logs) and line in logs[0].read_text(errors="replace")

    wait_for(accepted, timeout, f"{line!r} in the server's job log", interval=0.2)


def test_a_killed_site_is_reported_and_the_others_finish(tmp_path):
    runs = tmp_path / "runs"
    cmd = runner_cmd(runs, "--rounds", "3", "--min-clients", "1", "--site-timeout", "30", "--tracking", "workspace")
    proc = FollowedRun([*cmd, "--timeout", "600"], tmp_path / "stderr.txt")
    out, killed_at, job_id = [], None, None
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("submitted "):
                job_id = line.split("job_id ", 1)[1].split()[0]
            # killed in round 2 (1-based) once the server took its round-2 result: no upload is cut off, so the
            # job must complete with site-2 dropped from round 3
            if killed_at is None and "round 2/3 site-2:" in line:
                wait_until_accepted((runs / "latest").resolve(), job_id, "site-2", 1)
                processes = json.loads((runs / "latest" / "pids.json").read_text())["poc"]["processes"]
                assert kill_site(processes, "site-2")
                killed_at = time.time()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = "".join(out), proc.stderr_text()
    run_dir = (runs / "latest").resolve()
    assert killed_at is not None, stdout[-3000:] + stderr
    assert rc == 0, stdout[-3000:] + stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "FINISHED:COMPLETED", (s["status"], s.get("status_note"))
    assert {d["site"] for d in s["dropped"]} == {"site-2"} and s["dropped"][0]["round"] == 2, s["dropped"]
    noticed = s["dropped"][0]["at"] - killed_at
    assert "site-2 dropped: no train result in round" in stdout and "  dropped: site-2 sent no training" in stdout
    assert sorted(s["cross_site"]["SRV_FL_global_model.pt"]) == ["site-1"]
    # once dropped, site-2 is not waited for again: final validation and cross-site evaluation go without it
    server_log = (Path(s["paths"]["job_result"]) / s["job_id"] / "workspace" / "log.txt").read_text()
    assert "final validation of the last global model on 1 sites (not site-2: dropped in training)" in server_log
    assert "cross-site evaluation without site-2 (dropped in training)" in server_log
    finished = time.time() - killed_at
    print(f"site-2 killed: noticed after {noticed:.0f} s; run finished {finished:.0f} s later; {s['status']}")
    assert_nothing_left(run_dir)


def _round_seen(follower: LogFollower, site: str) -> bool:
    return any((e := parse_event(line)) and e["kind"] == "round" and e["site"] == site for line in follower.poll())


def test_too_few_sites_end_the_job_in_bounded_time_and_a_restarted_site_rejoins(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_train=8, num_test=0, shape=(64, 64, 16))
    make_site_datalists(data, 2, out_dir=tmp_path / "datalists")
    env = {DATA_DIR_ENV: str(data), DATALIST_ENV: str(tmp_path / "datalists" / "{site}.json")}
    settings = dict(local_epochs=1, min_clients=2, quick=True, tracking="workspace")
    with PocSystem(tmp_path / "poc", 2, env=env) as system:
        admin = JobAdmin(system.admin_startup_kit, system.env(), tmp_path / "admin.log")
        job = prepare_job(LOCAL_JOB, tmp_path / "job_b", JobSettings(rounds=3, site_timeout=20, **settings))
        follower = LogFollower([system.prod_dir / "site-2"])
        job_id = admin.submit(job)
        wait_for(lambda: _round_seen(follower, "site-2"), 180, "site-2's first round")
        kill_site(system.processes, "site-2")
        killed_at = time.monotonic()
        status = wait_finished(admin, job_id, 180)
        took = time.monotonic() - killed_at
        print(f"min_clients not met: job {status} {took:.0f} s after the kill (site timeout 20 s)")
        downloaded = admin.download(job_id, tmp_path / "download_b")
        server_log = next(downloaded.glob("*/workspace/log.txt")).read_text()  # the server's job log
        assert status != "FINISHED:COMPLETED" and took < 20 + 60, (status, took)
        assert "of min_clients 2 sites sent a training result" in server_log and "no result from site-2" in server_log
        assert any((e := parse_event(x)) and e["kind"] == "dropped" for x in server_log.splitlines())

        restarted = time.monotonic()
        system.restart_site("site-2")
        print(f"site-2 connected again {time.monotonic() - restarted:.0f} s after its restart")
        job = prepare_job(LOCAL_JOB, tmp_path / "job_c", JobSettings(rounds=1, site_timeout=120, **settings))
        job_id = admin.submit(job)
        assert wait_finished(admin, job_id, 300) == "FINISHED:COMPLETED"
        results = next(admin.download(job_id, tmp_path / "download").rglob("cross_val_results.json"))
        cross = json.loads(results.read_text())
        assert sorted(cross) == ["site-1", "site-2"], cross  # every site validated: site-2 is back
    assert system.alive_pids() == []
