"""The one command on a real POC + MLflow server: exit status, summary, cross-site matrix, MLflow, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import mlflow
import pytest
from conftest import (
    LOCAL_EPOCHS,
    REPO_ROOT,
    ROUNDS,
    SITES,
    FollowedRun,
    assert_best_model_is_the_best_scored,
    assert_nothing_left,
    assert_steps_weighted_fedavg,
    last_updates,
    runner_cmd,
)
from PIL import Image

from spleen_tools.job_result import GLOBAL_MODEL
from spleen_tools.run.stop import stop_run
from spleen_tools.systems.poc import poc_lock


def _output(run) -> str:
    return f"exit {run.returncode}\n--- stdout ---\n{run.stdout[-4000:]}\n--- stderr ---\n{run.stderr[-3000:]}"


def test_exits_zero_and_prints_results(experiment_run):
    assert experiment_run.returncode == 0, _output(experiment_run)
    out = experiment_run.stdout
    assert f"round {ROUNDS}/{ROUNDS} done" in out
    assert "cross-site validation (Dice, rows: models, columns: sites)" in out
    assert "untrained" in out and f"after {ROUNDS} rounds" in out
    assert "MLflow: http://127.0.0.1:" in out and "experiment 'spleen_ct_segmentation_local'" in out


def test_the_global_model_is_the_steps_weighted_mean_of_the_last_updates(experiment_run):
    """Plain FedAvg (NVFlare's InTimeAccumulateWeightedAggregator, weights = NUM_STEPS_CURRENT_ROUND): the last
    global model the server persisted is the sites' last updates weighted by their local steps (4 and 3)."""
    import torch

    s = experiment_run.summary
    updates = last_updates(experiment_run.run_dir, s["job_id"])
    assert {site: u["round"] for site, u in updates.items()} == dict.fromkeys(SITES, ROUNDS - 1)
    assert {site: u["steps"] for site, u in updates.items()} == {"site-1": 4 * LOCAL_EPOCHS, "site-2": 3 * LOCAL_EPOCHS}
    (path,) = Path(s["paths"]["job_result"]).rglob("app_server/FL_global_model.pt")
    stored = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert_steps_weighted_fedavg(updates, {k: v.double().numpy() for k, v in stored.items()})


def test_the_sites_hand_freed_memory_back_after_every_round(experiment_run):
    """The jobs' ``memory_gc_rounds`` 1 at the sites (NVFlare's Client API: gc.collect and malloc_trim)."""
    s = experiment_run.summary
    for site in SITES:
        log = Path(s["paths"][f"log_{site}"], s["job_id"], "log.txt").read_text()
        assert "Memory management enabled: cleanup every 1 round(s)" in log, site
        assert log.count("Memory cleanup performed at round") >= ROUNDS, site


def test_summary_fields_present_and_consistent(experiment_run):
    s = experiment_run.summary
    assert s["job_name"] == "spleen_ct_segmentation_local" and s["status"] == "FINISHED:COMPLETED"
    assert s["job_id"] and s["sites"] == SITES
    assert s["rounds"] == ROUNDS and s["local_epochs"] == LOCAL_EPOCHS
    assert len(s["round_times_s"]) == ROUNDS and all(t > 0 for t in s["round_times_s"])
    assert 0 < sum(s["round_times_s"]) < s["wall_time_s"] < experiment_run.seconds + 1
    # the server's own round times (from its log) hold the sites' work
    assert len(s["fl_round_s"]) == ROUNDS and len(s["site_work_s"]) == ROUNDS
    assert all(0 < w < t for w, t in zip(s["site_work_s"], s["fl_round_s"], strict=True))
    assert sorted(s["untrained_dice"]) == SITES
    assert all(0.0 <= d <= 1.0 for d in s["untrained_dice"].values())
    assert s["mlflow"]["tracking_uri"].startswith("http://127.0.0.1:") and s["mlflow"]["experiment_id"]
    assert sorted(s["mlflow"]["run_ids"]) == SITES
    run_dir = experiment_run.run_dir
    assert (run_dir.parent / "latest").resolve() == run_dir
    assert (run_dir / "job_result" / s["job_id"]).is_dir(), "the downloaded job"
    assert (run_dir / "cross_val_results.json").is_file()
    assert (run_dir / "mlflow" / "mlflow.db").is_file()
    assert (run_dir / "poc" / "example_project" / "prod_00" / "site-1" / s["job_id"] / "log.txt").is_file()
    for site in SITES:
        lists = json.loads((run_dir / "datalists" / f"{site}.json").read_text())
        assert lists["training"] and lists["validation"]


def test_cross_site_matrix_is_complete(experiment_run):
    cross = experiment_run.summary["cross_site"]
    assert {GLOBAL_MODEL, *SITES} <= set(cross), sorted(cross)
    for model, by_site in cross.items():
        assert sorted(by_site) == SITES, (model, by_site)
        assert all(0.0 <= d <= 1.0 for d in by_site.values()), (model, by_site)
    assert experiment_run.summary["final_global_dice"] == cross[GLOBAL_MODEL]
    raw = json.loads((experiment_run.run_dir / "cross_val_results.json").read_text())
    assert raw[SITES[0]][GLOBAL_MODEL]["val_mean_dice"] == cross[GLOBAL_MODEL][SITES[0]]


def test_mlflow_server_holds_per_site_series(experiment_run, run_mlflow):
    client = mlflow.MlflowClient(run_mlflow.url)
    s = experiment_run.summary
    epochs = ROUNDS * LOCAL_EPOCHS
    experiment = client.get_experiment(s["mlflow"]["experiment_id"])
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"  # opens as training runs
    assert f"/#/experiments/{experiment.experiment_id}/runs?compareRunsMode=CHART" in experiment_run.stdout
    for site, run_id in s["mlflow"]["run_ids"].items():
        run = client.get_run(run_id)
        assert site in run.info.run_name and run.info.experiment_id == s["mlflow"]["experiment_id"]
        dice = client.get_metric_history(run_id, "val_mean_dice")
        loss_epoch = client.get_metric_history(run_id, "train_loss_epoch")
        loss = client.get_metric_history(run_id, "train_loss")
        global_dice = client.get_metric_history(run_id, "global_val_mean_dice")
        assert len(dice) == epochs and len({m.step for m in dice}) == epochs, (site, dice)
        assert len(loss_epoch) == epochs, (site, loss_epoch)
        assert len(loss) >= epochs, (site, loss)
        assert sorted(m.step for m in global_dice) == list(range(ROUNDS + 1)), (site, global_dice)  # + final
        assert global_dice[0].value == pytest.approx(s["untrained_dice"][site], abs=1e-3)


def test_best_global_model_is_the_best_scored_one(experiment_run):
    assert_best_model_is_the_best_scored(experiment_run.summary)
    assert "best global model: " in experiment_run.stdout


def test_run_directory_holds_the_pictures(experiment_run):
    plots = experiment_run.summary["plots"]
    assert sorted(plots) == ["cross_site_heatmap", "learning_curves"]
    for path in map(Path, plots.values()):
        assert path.parent == experiment_run.run_dir and f": {path}" in experiment_run.stdout
        with Image.open(path) as image:
            assert image.format == "PNG" and len(image.convert("RGB").getcolors(1 << 20)) > 20, path


def test_run_directory_holds_the_verified_model_bundle(experiment_run):
    exported = experiment_run.summary["model_bundle"]
    bundle = Path(exported["path"])
    assert bundle == experiment_run.run_dir / "model_bundle" / "spleen_ct_segmentation"
    assert f"model bundle: {bundle}" in experiment_run.stdout
    assert exported["torchscript_max_abs_diff"] <= 1e-4
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["federated_training"]["job_id"] == experiment_run.summary["job_id"]
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["roi_size"] == [48, 48, 48]  # the sites trained with the CPU-quick override (--quick)
    dice = experiment_run.summary["final_global_dice"]
    assert meta["federated_training"]["cross_site_dice"] == pytest.approx(dice, abs=1e-4)  # rounded to 4 places
    # the exported weights are the server's final global model, byte for byte in the tensors
    import torch

    (server_model,) = Path(experiment_run.summary["paths"]["job_result"]).rglob("app_server/FL_global_model.pt")
    final = torch.load(server_model, map_location="cpu", weights_only=True)["model"]
    exported_weights = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(final[k], exported_weights[k]) for k in final)


def test_no_process_of_the_run_is_left(experiment_run):
    recorded = experiment_run.pid_file.read()
    assert "mlflow" in recorded and {"server", *SITES} <= set(recorded["poc"]["processes"]), recorded
    assert len(experiment_run.pid_file.refs()) >= 8  # MLflow, poc start, server and sites with their daemons
    assert_nothing_left(experiment_run.run_dir)


def test_second_run_while_one_is_active_fails_clearly(experiment_run, tmp_path):
    """Hold the POC lock the way an active run does; a second run must stop at once, saying why, leaving nothing."""
    with poc_lock("an active test run"):
        proc = subprocess.run(
            runner_cmd(tmp_path, "--timeout", "300"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=400
        )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: another POC run is active (pid ")
    assert not (tmp_path / "latest").exists(), "a refused run must not take runs/latest"
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name[0].isdigit()]
    assert_nothing_left(run_dir, tmp_path)


def _own_foreground_group() -> None:
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_run(tmp_path, *extra: str, **popen_args) -> FollowedRun:
    """The one command on the test settings (``extra`` options override them), its output piped, unbuffered."""
    return FollowedRun(runner_cmd(tmp_path, "--timeout", "600", *extra), tmp_path / "stderr.txt", **popen_args)


def _kill_and_clean_up(proc: subprocess.Popen, tmp_path) -> None:
    """A run that did not end by itself (test failed or interrupted): kill it and stop what it left up."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        if (tmp_path / "latest" / "pids.json").exists():
            stop_run(tmp_path / "latest", out=lambda _line: None)


# Ctrl-C at each phase, as a terminal sends it: SIGINT to the whole foreground process group (the runner and any
# `nvflare` CLI call it is waiting on), triggered by the run's own output line for that phase.
CTRL_C_PHASES = {
    "mlflow": ("MLflow: http", ("starting MLflow", "starting the FL system")),
    "poc": ("starting the FL system", ("starting the FL system",)),
    "mid_round": (f"round 1/{ROUNDS} site-", ("running job ",)),
    "download": ("job ", ("running job ", "collecting results")),  # "job <id> finished: ...", then the download
}
# the download comes after the whole job: one round is enough to get there
CTRL_C_EXTRA = {"download": ("--rounds", "1")}


@pytest.mark.parametrize("phase", list(CTRL_C_PHASES))
def test_ctrl_c_to_the_foreground_group_stops_everything(experiment_run, tmp_path, phase):
    """Exit 130, no process of the run left (the process table, NVFlare's job processes included), stopped.json
    names the phase. Runs after experiment_run, so no other POC is up."""
    trigger, phases = CTRL_C_PHASES[phase]
    # The runner leads its own group, as a shell's foreground job; SIGINT gets its default action in it (a shell
    # starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt).
    proc = _start_run(tmp_path, *CTRL_C_EXTRA.get(phase, ()), preexec_fn=_own_foreground_group)
    try:
        for line in proc.stdout:
            # progress lines start with the run's clock ("[1:10] round 1/2 site-1: ...")
            if trigger in line and (phase != "download" or (line.startswith("job ") and " finished: " in line)):
                break
        else:
            pytest.fail(f"never printed {trigger!r}: {proc.stderr_text()}")
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        _kill_and_clean_up(proc, tmp_path)
    err = proc.stderr_text()
    assert rc == 130, err
    run_dir = (tmp_path / "latest").resolve()
    assert_nothing_left(run_dir, tmp_path)
    stopped = json.loads((run_dir / "stopped.json").read_text())  # where the run was when it stopped
    assert stopped["reason"] == "interrupted (Ctrl-C / SIGINT)" and stopped["phase"].startswith(phases), stopped
    with poc_lock(f"after Ctrl-C in {phase}"):  # the lock is free again
        pass


def test_sigterm_once_mlflow_runs_stops_it_and_says_where(tmp_path):
    """SIGTERM right after the MLflow server started (its own process group of about nine): exit 143, MLflow and
    everything else stopped, ``stopped.json`` names the phase."""
    proc = _start_run(tmp_path)
    try:
        for line in proc.stdout:
            if line.startswith("MLflow: http"):
                proc.send_signal(signal.SIGTERM)
                break
        rc = proc.wait(timeout=180)
    finally:
        _kill_and_clean_up(proc, tmp_path)
    assert rc == 143, proc.stderr_text()
    run_dir = (tmp_path / "latest").resolve()
    assert "mlflow" in json.loads((run_dir / "pids.json").read_text())
    assert_nothing_left(run_dir, tmp_path)
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["phase"] in ("starting MLflow", "starting the FL system"), stopped
