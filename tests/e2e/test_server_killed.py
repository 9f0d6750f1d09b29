"""The server killed mid-job (marked ``faults``): its restart loop brings it back, and the run resumes the job.

NVFlare 2.9 keeps no job snapshot: the restarted server has lost the job, which stays RUNNING in its job store.
The one command notices the server's new start time, waits for the sites, and submits the job again with
``resume_from``: the server's persistor goes on from the last global model it wrote, so every round runs once
after it and the global model history is continuous. With ``--max-resumes 0`` it says it cannot resume, and what
to do, and leaves nothing running.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from conftest import REPO_ROOT, assert_best_model_is_the_best_scored, assert_nothing_left, runner_cmd

from spleen_flare.resume import HISTORY_FILE
from spleen_tools.mlflow_server import MLflowServer
from spleen_tools.run.plots import TRAIN_LOSS

pytestmark = pytest.mark.faults
ROUNDS = 3


def kill_server(runs: Path) -> int:
    """SIGKILL the POC server process and its job process; its restart loop (``sub_start.sh``) stays."""
    processes = json.loads((runs / "latest" / "pids.json").read_text())["poc"]["processes"]
    server = psutil.Process(processes["server"]["pid"])
    victims = [server, *server.children(recursive=True)]
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    return server.pid


def persisted(runs: Path) -> list[dict]:
    """The running job's global model history in the server's job folder, once a global model is saved there
    (the history is written just before the checkpoint); empty before."""
    try:
        job_id = json.loads((runs / "latest" / "pids.json").read_text())["job_id"]
        app = next((runs / "latest" / "poc").glob("*/prod_00/server")) / job_id / "app_server"
        history = json.loads((app / HISTORY_FILE).read_text())
        return history if (app / "FL_global_model.pt").is_file() else []
    except (OSError, KeyError, StopIteration, ValueError):
        return []


def run_and_kill_the_server(runs: Path, after_round: int, *extra: str) -> tuple[int, str, str, float]:
    """The one command; its server killed as soon as it has persisted the global model of ``after_round``.
    (exit status, stdout, stderr, time of the kill)."""
    cmd = runner_cmd(runs, "--rounds", str(ROUNDS), "--timeout", "900", *extra)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    killed_at = [0.0]

    def killer() -> None:
        while proc.poll() is None and not killed_at[0]:
            if any(e.get("round") == after_round for e in persisted(runs)):
                kill_server(runs)
                killed_at[0] = time.time()
            time.sleep(0.05)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.join(timeout=5)
    return proc.returncode, stdout, stderr, killed_at[0]


def test_a_killed_server_comes_back_and_the_job_resumes_from_its_last_global_model(tmp_path):
    runs = tmp_path / "runs"
    # killed in round 1 (0-based), right after it persisted round 0's global model
    rc, stdout, stderr, killed_at = run_and_kill_the_server(runs, after_round=0)
    run_dir = (runs / "latest").resolve()
    assert killed_at, stdout[-3000:] + stderr
    assert rc == 0, stdout[-3000:] + stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "FINISHED:COMPLETED"
    [resumed] = s["resumed"]
    assert resumed["job_id"] == s["job_id"] != resumed["lost_job"]
    assert resumed["next_round"] == 1, resumed  # the round the server was in when it died, run again
    assert "the server restarted while job" in stdout and "the server resumed job" in stdout

    # the global model history is continuous: every round once, in order, across both jobs
    history = json.loads(next(Path(s["paths"]["job_result"]).rglob(HISTORY_FILE)).read_text())
    rounds = [e["round"] for e in history if "sha256" in e and not e.get("best")]
    assert rounds == ["initial", *range(ROUNDS)], history
    assert {"resumed_from": resumed["lost_job"], "next_round": 1} in history
    assert sorted(s["global_dice_per_round"]) == [str(r) for r in range(ROUNDS + 1)]
    assert_best_model_is_the_best_scored(s, ROUNDS)
    assert sorted(s["cross_site"]["SRV_FL_global_model.pt"]) == ["site-1", "site-2"]
    # the lost job's metrics stay in its own MLflow runs; the resumed job's runs name it
    assert sorted(resumed["lost_job_mlflow_run_ids"]) == ["site-1", "site-2"]
    with MLflowServer(run_dir / "mlflow") as server:  # the run's own store, served again
        client = mlflow.MlflowClient(server.url)
        run_id = s["mlflow"]["run_ids"]["site-1"]
        tags = client.get_run(run_id).data.tags
        epochs = sorted(m.step for m in client.get_metric_history(run_id, TRAIN_LOSS))
    assert tags.get("resumed_from") == resumed["lost_job"], tags
    assert epochs == [2, 3], epochs  # rounds 2 and 3 of one local epoch each: the epoch count goes on
    took = resumed["noticed_at"] - killed_at
    print(f"server killed in round 2: restart noticed after {took:.0f} s, sites back after {resumed['sites_back_s']} s")
    assert_nothing_left(run_dir)


def test_a_server_restart_it_may_not_resume_stops_the_run_saying_what_to_do(tmp_path):
    runs = tmp_path / "runs"
    rc, stdout, stderr, killed_at = run_and_kill_the_server(runs, 0, "--max-resumes", "0")
    run_dir = (runs / "latest").resolve()
    assert killed_at and rc == 1, stdout[-3000:] + stderr
    assert "cannot be resumed: --max-resumes 0 reached" in stderr, stderr
    assert "run the command again" in stderr
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["phase"].startswith("running job"), stopped
    assert_nothing_left(run_dir)
