"""Reading a run's metrics back from each tracking mode: MLflow SQLite store, TensorBoard event files, URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from spleen_flare.contract import GLOBAL_METRIC, KEY_METRIC
from spleen_tools.run.plots import TRAIN_LOSS, read_curves
from spleen_tools.run.summary import RunSummary, Tracking
from spleen_tools.run.tracking import (
    WORKSPACE_STORE,
    charts_url,
    mlflow_curves,
    mlflow_runs,
    tensorboard_curves,
    tensorboard_dirs,
    workspace_store,
)

METRICS = (TRAIN_LOSS, KEY_METRIC, GLOBAL_METRIC)


def _write_tb(folder: Path, offset: float) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    for step in range(3):
        writer.add_scalar(TRAIN_LOSS, 1.0 - 0.2 * step + offset, step)
        writer.add_scalar(KEY_METRIC, 0.3 * step + offset, step)
    writer.close()


def test_tensorboard_series_per_site_from_a_downloaded_job(tmp_path):
    job = tmp_path / "job_result" / "abc" / "workspace"
    for k, site in enumerate(("site-1", "site-2")):
        _write_tb(job / "tb_events" / site, 0.01 * k)
    dirs = tensorboard_dirs(tmp_path / "job_result", ["site-1", "site-2"])
    assert dirs == {s: str(job / "tb_events" / s) for s in ("site-1", "site-2")}
    curves = tensorboard_curves(dirs, METRICS)
    assert [s for s, _ in curves["site-2"][TRAIN_LOSS]] == [0, 1, 2]
    assert [v for _, v in curves["site-2"][KEY_METRIC]] == pytest.approx([0.01, 0.31, 0.61])
    assert curves["site-1"][GLOBAL_METRIC] == []  # a series the sites never sent is empty, not an error
    assert read_curves(RunSummary(tracking=Tracking(tensorboard={"site_dirs": dirs}))) == curves


def test_workspace_store_is_found_and_read_with_the_mlflow_client(tmp_path):
    import mlflow

    store = tmp_path / "job_result" / "abc" / "workspace" / WORKSPACE_STORE
    store.parent.mkdir(parents=True)
    uri = workspace_store(tmp_path / "job_result")
    assert uri is None
    store_uri = f"sqlite:///{store}"
    client = mlflow.MlflowClient(store_uri)
    experiment = client.create_experiment("spleen_ct_segmentation_local")
    run = client.create_run(experiment, run_name="site-1-fedavg-spleen_ct_segmentation_local")
    for step in range(2):
        client.log_metric(run.info.run_id, KEY_METRIC, 0.5 + step / 10, step=step)
    uri = workspace_store(tmp_path / "job_result")
    assert uri == store_uri
    info = mlflow_runs(uri, "spleen_ct_segmentation_local", None, ["site-1"])
    assert info["run_ids"] == {"site-1": run.info.run_id}
    assert mlflow_curves(uri, info["run_ids"], (KEY_METRIC,))["site-1"][KEY_METRIC] == [(0, 0.5), (1, 0.6)]
    assert charts_url(info) is None  # a file store has no web UI of its own


def test_charts_url_opens_the_runs_as_charts():
    info = {"tracking_uri": "http://127.0.0.1:5000", "experiment_id": "1"}
    assert charts_url(info) == "http://127.0.0.1:5000/#/experiments/1/runs?compareRunsMode=CHART"
    assert charts_url({**info, "experiment_id": None}) is None


def test_a_lost_job_and_the_job_that_resumed_it_make_one_curve_per_series(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("spleen_ct_segmentation_local")
    lost = client.create_run(experiment, run_name="site-1-aaaaaa-lost").info.run_id
    resumed = client.create_run(experiment, run_name="site-1-bbbbbb-resumed").info.run_id
    for rnd in range(3):  # the lost job got into round 2, then the server died
        client.log_metric(lost, GLOBAL_METRIC, 0.1 * rnd, step=rnd)
    for rnd in range(2, 4):  # the resumed job ran round 2 again, then round 3
        client.log_metric(resumed, GLOBAL_METRIC, 0.5 + 0.1 * rnd, step=rnd)
    summary = RunSummary(
        tracking=Tracking(mlflow={"tracking_uri": uri, "run_ids": {"site-1": resumed}}),
        resumed=[{"lost_job": "a", "job_id": "b", "lost_job_mlflow_run_ids": {"site-1": lost}}],
    )
    series = read_curves(summary)["site-1"][GLOBAL_METRIC]
    assert series == [(0, 0.0), (1, 0.1), (2, pytest.approx(0.7)), (3, pytest.approx(0.8))]
