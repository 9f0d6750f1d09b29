"""The MLflow server stopped for about 30 s in the middle of a run, then started again on its port and store: no
metric point is lost (every site's series complete at the end, counted through the MLflow client). Marked faults.

The one command starts MLflow; the test kills that server's process group once the first round is done (the
server's sites go on training and streaming), waits, and starts a new server on the same port and SQLite store.
"""

from __future__ import annotations

import json
import os
import signal
import time

import mlflow
import pytest
from conftest import SITES, FollowedRun, assert_nothing_left, runner_cmd

from spleen_tools.mlflow_server import MLflowServer
from spleen_tools.procs import ProcessRef

pytestmark = pytest.mark.faults
ROUNDS, LOCAL_EPOCHS, OUTAGE_S = 3, 2, 30


def test_no_metric_point_is_lost_when_mlflow_is_down_for_30_s(tmp_path):
    runs = tmp_path / "runs"
    cmd = runner_cmd(runs, "--rounds", str(ROUNDS), "--local-epochs", str(LOCAL_EPOCHS), "--timeout", "900")
    proc = FollowedRun(cmd, tmp_path / "stderr.txt")
    replacement, out = None, []
    try:
        for line in proc.stdout:
            out.append(line)
            if replacement is None and "round 1/3 done" in line:
                run_dir = (runs / "latest").resolve()
                settings = json.loads((run_dir / "settings.json").read_text())
                pids = json.loads((run_dir / "pids.json").read_text())
                port = int(next(x for x in out if x.startswith("MLflow: http")).split(":")[3].split()[0])
                os.killpg(ProcessRef.from_json(pids["mlflow"]).pid, signal.SIGKILL)  # the server and its workers
                down_at = time.monotonic()
                time.sleep(OUTAGE_S)
                replacement = MLflowServer(run_dir / "mlflow", port=port).start()
                print(f"MLflow down {time.monotonic() - down_at:.0f} s (port {port}); job {settings['job']}")
        rc = proc.wait(timeout=120)
        stdout = "".join(out)
        assert replacement is not None and rc == 0, stdout[-3000:] + proc.stderr_text()
        summary = json.loads((run_dir / "summary.json").read_text())
        client = mlflow.MlflowClient(replacement.url)
        epochs = ROUNDS * LOCAL_EPOCHS
        for site in SITES:
            run_id = summary["mlflow"]["run_ids"][site]
            for name, expected in (("train_loss_epoch", epochs), ("val_mean_dice", epochs)):
                steps = sorted(m.step for m in client.get_metric_history(run_id, name))
                assert len(steps) == expected and len(set(steps)) == expected, (site, name, steps)
            global_dice = sorted(m.step for m in client.get_metric_history(run_id, "global_val_mean_dice"))
            assert global_dice == list(range(ROUNDS + 1)), (site, global_dice)
            assert len(client.get_metric_history(run_id, "train_loss")) >= epochs
        assert_nothing_left(run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
        if replacement is not None:
            replacement.stop()
