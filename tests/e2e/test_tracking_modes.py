"""--tracking workspace, tensorboard and wandb on a real POC run: no MLflow server, the metrics come back with the
downloaded job, and each store read back (MLflow client / TensorBoard's event reader / the W&B run files) holds
every site's loss and Dice with one point per epoch, and the global model's Dice per round.

Each run also takes one FL method through the one command (``--algorithm``): FedOpt (workspace), FedProx
(tensorboard), FedBN (wandb), each checked where it shows: the server's optimizer step, the sites' proximal term,
the BatchNorm layers that never left the sites. The workspace run trains with DP-SGD too (``--dp-noise`` and a
budget with room for one of its two rounds): each site's epsilon is Opacus's own RDP figure for the same steps,
both sites say the budget has no room for round 2, the server ends training there and the job completes, with
``dp_epsilon`` in MLflow and the trained network (instance norm) in the model bundle."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
from conftest import LOCAL_EPOCHS, REPO_ROOT, SITES, runner_cmd
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from spleen_flare.bundle_runner import build_network
from spleen_flare.contract import GLOBAL_METRIC, KEY_METRIC
from spleen_tools.paths import BUNDLE_SRC
from spleen_tools.run.plots import CURVE_METRICS, TRAIN_LOSS
from spleen_tools.run.tracking import mlflow_curves, tensorboard_curves
from spleen_tools.run.wandb_files import wandb_curves


def _run(tmp_path: Path, mode: str, *extra: str, **env: str) -> tuple[dict, str]:
    proc = subprocess.run(
        runner_cmd(tmp_path, "--rounds", "1", "--tracking", mode, "--timeout", "900", *extra),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1000,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run_dir = (tmp_path / "latest").resolve()
    assert not (run_dir / "mlflow").exists()  # no MLflow server was started
    return json.loads((run_dir / "summary.json").read_text()), proc.stdout


def _assert_complete(curves: dict) -> None:
    epochs = list(range(1, 1 * LOCAL_EPOCHS + 1))  # the bundle's epochs count from 1
    assert sorted(curves) == SITES
    for site, series in curves.items():
        assert [s for s, _ in series[TRAIN_LOSS]] == epochs, (site, series)
        assert [s for s, _ in series[KEY_METRIC]] == epochs, (site, series)
        assert [s for s, _ in series[GLOBAL_METRIC]] == [0, 1], (site, series)  # round 0 and the final validation


def _job_log(summary: dict, who: str) -> str:
    if who == "server":
        return (Path(summary["paths"]["job_result"]) / summary["job_id"] / "workspace" / "log.txt").read_text()
    return Path(summary["paths"][f"log_{who}"], summary["job_id"], "log.txt").read_text()


DP_SIGMA, DP_DELTA, DP_CASES = 1.0, 1e-5, 3  # 8 synthetic cases: 3 training cases a site, 1 epoch = 3 draws
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's RDPAccountant's default orders


def opacus_epsilon(steps: int) -> float:
    rdp = compute_rdp(q=1 / DP_CASES, noise_multiplier=DP_SIGMA, steps=steps, orders=RDP_ORDERS)
    return float(get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=DP_DELTA)[0])


DP_BUDGET = round((opacus_epsilon(DP_CASES) + opacus_epsilon(2 * DP_CASES)) / 2, 4)  # room for one round of two


def test_workspace_store_comes_back_with_the_job(tmp_path):
    dp = ["--rounds", "2", "--dp-noise", str(DP_SIGMA), "--dp-delta", str(DP_DELTA), "--dp-max-epsilon", str(DP_BUDGET)]
    summary, stdout = _run(tmp_path, "workspace", "--algorithm", "fedopt", *dp)
    uri = summary["mlflow"]["tracking_uri"]
    assert uri.startswith("sqlite:///") and Path(summary["paths"]["job_result"]) in Path(uri[10:]).parents
    assert f"mlflow ui --backend-store-uri {uri}" in stdout
    _assert_complete(mlflow_curves(uri, summary["mlflow"]["run_ids"], CURVE_METRICS))
    assert "learning_curves" in summary["plots"]
    # FedOpt: the server's optimizer made the round's update, and the runs say which method trained
    assert "FedOpt (sgd, cpu) server model update round 0" in _job_log(summary, "server")
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary["mlflow"]["run_ids"]["site-1"])
    assert client.get_experiment(run.info.experiment_id).tags["algorithm"] == "FedOpt"
    _assert_dp_accounted(summary, stdout, client)


def _assert_dp_accounted(summary: dict, stdout: str, client: mlflow.MlflowClient) -> None:
    """DP-SGD's accounting against Opacus's own, the budget's end of training, and what the run kept of it."""
    expected = opacus_epsilon(DP_CASES)
    assert summary["status"] == "FINISHED:COMPLETED" and summary["dp"]["delta"] == DP_DELTA
    assert summary["dp"]["epsilon_per_round"] == {"0": {s: pytest.approx(expected, abs=1e-4) for s in SITES}}
    assert summary["dp"]["steps"] == dict.fromkeys(SITES, DP_CASES)
    for site in SITES:
        assert f'"DP-SGD: {DP_CASES} cases, each drawn with probability 0.333 per step, noise 1' in _job_log(
            summary, site
        )
        would = f"epsilon would reach {opacus_epsilon(2 * DP_CASES):.3g} > its budget {DP_BUDGET:g}"
        assert f"{site} stops before round 2: {would}" in stdout
        history = client.get_metric_history(summary["mlflow"]["run_ids"][site], "dp_epsilon")
        assert [m.value for m in history] == [pytest.approx(expected, abs=1e-4)], site
    assert "training ends after round 0 of 2: site-1, site-2 reached the DP budget" in _job_log(summary, "server")
    assert sorted(summary["global_dice_per_round"]) == ["0", "1"]  # one round trained, then the final model
    inference = Path(summary["model_bundle"]["path"], "configs", "inference.json")
    assert json.loads(inference.read_text())["network_def"]["norm"] == ["instance", {"affine": True}]


def test_tensorboard_event_files_per_site(tmp_path):
    """Also ``--keep results``: once the run stopped, only the copies of the model it no longer needs are gone."""
    summary, stdout = _run(tmp_path, "tensorboard", "--keep", "results", "--algorithm", "fedprox")
    dirs = summary["tensorboard"]["site_dirs"]
    assert all(Path(summary["paths"]["job_result"]) in Path(d).parents for d in dirs.values())
    assert "tensorboard --logdir" in stdout
    _assert_complete(tensorboard_curves(dirs, CURVE_METRICS))
    assert "learning_curves" in summary["plots"]
    _assert_only_results_kept((tmp_path / "latest").resolve(), summary, stdout)
    for site in SITES:  # FedProx: each site trained with the proximal term
        assert '"note": "FedProx mu 0.01"' in _job_log(summary, site)


def _assert_only_results_kept(run_dir: Path, summary: dict, stdout: str) -> None:
    server = Path(summary["paths"]["job_result"]) / summary["job_id"] / "workspace"
    # every file of a model's size (19 MB; the cross-site result files named .pt hold a few numbers)
    models = {p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size > 2**20}
    kept = {server / "app_server" / name for name in ("FL_global_model.pt", "best_FL_global_model.pt")}
    kept |= {run_dir / "model_bundle/spleen_ct_segmentation/models" / name for name in ("model.pt", "model.ts")}
    assert models == kept, models
    assert not list(run_dir.glob("poc/jobs-storage/*/workspace")) and not list(server.glob("cross_site_val/model_*/*"))
    for site in SITES:  # every log stays, the sites' progress lines with them
        assert "[spleen]" in Path(summary["paths"][f"log_{site}"], summary["job_id"], "log.txt").read_text()
    assert (run_dir / "cross_val_results.json").is_file()
    removed_mb = int(stdout.split("--keep results: removed ", 1)[1].split("(", 1)[1].split(" MB", 1)[0])
    assert removed_mb > 100, stdout[-2000:]  # 8 site copies, the job store, the cross-site models


def test_wandb_online_with_a_bad_key_is_one_line_and_the_runs_come_back_offline(tmp_path):
    """Online asked for (key and project set), no way to log in here: one line, the job completes, and the runs
    are the offline files that came back with the job, with the command that uploads them."""
    key = "0123456789abcdef0123456789abcdef01234567"  # W&B's key format, valid nowhere
    summary, stdout = _run(
        tmp_path, "wandb", "--algorithm", "fedbn", WANDB_API_KEY=key, WANDB_PROJECT="spleen-e2e", WANDB_BASE_URL=_CLOSED
    )
    assert summary["status"] == "FINISHED:COMPLETED"
    wandb = summary["wandb"]
    assert wandb["mode"] == "online" and wandb["failed_login"].startswith("W&B login failed"), wandb
    assert [line for line in stdout.splitlines() if "W&B login failed" in line] == [f"W&B: {wandb['failed_login']}"]
    assert all(Path(summary["paths"]["job_result"]) in Path(f).parents for f in wandb["run_files"].values())
    assert "wandb sync " in stdout and key not in stdout
    _assert_complete(wandb_curves(wandb["run_files"], CURVE_METRICS))
    assert "learning_curves" in summary["plots"]
    _assert_batchnorm_stayed_at_the_sites(summary)


def _assert_batchnorm_stayed_at_the_sites(summary: dict) -> None:
    """FedBN: the server's global model still has the initial BatchNorm layers (no site sent its own) and trained
    convolutions; the exported model is site-1's copy, with its trained BatchNorm layers."""
    import torch

    initial = build_network(BUNDLE_SRC, ["configs/train.json"], seed=0)
    norms = {
        f"{name}.{key}"
        for name, module in initial.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for key in module.state_dict()
    }
    initial = initial.state_dict()
    app_server = Path(summary["paths"]["job_result"]) / summary["job_id"] / "workspace" / "app_server"
    server = torch.load(app_server / "FL_global_model.pt", map_location="cpu", weights_only=True)["model"]
    unchanged = {k for k in server if torch.equal(torch.as_tensor(server[k]).float(), initial[k].float())}
    assert norms and unchanged == norms, sorted(unchanged ^ norms)[:5]
    exported = torch.load(Path(summary["model_bundle"]["path"]) / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(exported[k].float(), torch.as_tensor(server[k]).float()) for k in server if k not in norms)
    assert not any(torch.equal(exported[k], initial[k]) for k in norms if k.endswith("running_mean"))


def _closed_port() -> str:
    """A loopback URL nothing listens on: the login fails at once, and nothing is sent off this machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


_CLOSED = _closed_port()
