"""DP-SGD at the sites of the HE job on a real ``nvflare poc prepare -he`` system, run by the one command: 2 sites
with 3 training cases each, a fixed noise multiplier and a budget that leaves room for 2 of 3 rounds. Each site's
epsilon after every round equals Opacus's own RDP analysis of the same steps; after round 2 both sites say that
their budget has no room for round 3, the server ends training there and the job goes on to validation and
cross-site evaluation; the model bundle carries the network the sites trained (instance norm)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import REPO_ROOT, SITES, runner_cmd
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

pytestmark = pytest.mark.he

SIGMA, DELTA, CASES = 1.0, 1e-5, 3  # 8 synthetic cases: 3 training and 1 validation case per site
STEPS_PER_ROUND = CASES  # 1 local epoch of 1/q = 3 draws (batch 1 case)
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's RDPAccountant's default orders


def opacus_epsilon(steps: int) -> float:
    rdp = compute_rdp(q=1 / CASES, noise_multiplier=SIGMA, steps=steps, orders=ORDERS)
    return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=DELTA)[0])


BUDGET = (opacus_epsilon(2 * STEPS_PER_ROUND) + opacus_epsilon(3 * STEPS_PER_ROUND)) / 2


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = tmp_path_factory.mktemp("dp_runs")
    dp = ["--dp-noise", str(SIGMA), "--dp-delta", str(DELTA), "--dp-max-epsilon", f"{BUDGET:.4f}"]
    cmd = runner_cmd(runs, "--job", "he", "--rounds", "3", *dp, "--timeout", "900")
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1000, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    summaries = list(runs.glob("*/summary.json"))
    assert summaries, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summaries[0].read_text())
    summary["_run_dir"], summary["_returncode"], summary["_stdout"] = summaries[0].parent, proc.returncode, proc.stdout
    return summary


def site_log(run: dict, site: str) -> str:
    return (run["_run_dir"] / "poc" / "example_project" / "prod_00" / site / run["job_id"] / "log.txt").read_text()


def test_epsilon_per_round_is_opacus_own_figure_for_the_same_steps(dp_run: dict) -> None:
    for site in SITES:
        assert f'"DP-SGD: {CASES} cases, each drawn with probability 0.333 per step, noise 1' in site_log(dp_run, site)
    dp = dp_run["dp"]
    assert dp["delta"] == DELTA and dp["noise_multiplier"] == dict.fromkeys(SITES, SIGMA)
    for rnd in (0, 1):
        expected = opacus_epsilon((rnd + 1) * STEPS_PER_ROUND)
        for site in SITES:
            assert dp["epsilon_per_round"][str(rnd)][site] == pytest.approx(expected, abs=1e-4), (rnd, site)
    assert dp["steps"] == dict.fromkeys(SITES, 2 * STEPS_PER_ROUND)


def test_sites_stop_at_their_budget_and_the_job_ends_well(dp_run: dict) -> None:
    assert dp_run["status"] == "FINISHED:COMPLETED" and dp_run["_returncode"] == 0, dp_run["_stdout"][-3000:]
    assert sorted(dp_run["global_dice_per_round"]) == ["0", "1", "2"]  # 2 rounds trained, then the final model
    would = opacus_epsilon(3 * STEPS_PER_ROUND)
    for site in SITES:
        line = f"{site} stops before round 3: epsilon would reach {would:.3g} > its budget {float(f'{BUDGET:.4f}'):g}"
        assert line in dp_run["_stdout"]
    server = dp_run["_run_dir"] / "job_result" / dp_run["job_id"] / "workspace" / "log.txt"  # the server's job log
    assert "training ends after round 1 of 3: site-1, site-2 reached the DP budget" in server.read_text()
    assert {"SRV_FL_global_model.pt", *SITES} <= set(dp_run["cross_site"])


def test_mlflow_has_epsilon_per_round_and_the_bundle_the_trained_network(dp_run: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{dp_run['_run_dir'] / 'mlflow' / 'mlflow.db'}")
    for site, run_id in dp_run["mlflow"]["run_ids"].items():
        history = client.get_metric_history(run_id, "dp_epsilon")
        assert [round(m.value, 4) for m in sorted(history, key=lambda m: m.step)] == [
            pytest.approx(dp_run["dp"]["epsilon_per_round"][str(r)][site], abs=1e-4) for r in (0, 1)
        ], site
    inference = json.loads(
        (dp_run["_run_dir"] / "model_bundle" / "spleen_ct_segmentation" / "configs" / "inference.json").read_text()
    )
    assert inference["network_def"]["norm"] == ["instance", {"affine": True}]
    assert dp_run["model_bundle"]["path"]
