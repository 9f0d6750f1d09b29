"""The run's PNG plots: real images with content, and learning curves read back from a real (SQLite) MLflow store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from spleen_flare.contract import GLOBAL_METRIC, KEY_METRIC
from spleen_tools.job_result import GLOBAL_MODEL
from spleen_tools.run.plots import (
    TRAIN_LOSS,
    plot_cross_site_heatmap,
    plot_learning_curves,
    read_curves,
    row_order,
    write_run_plots,
)
from spleen_tools.run.summary import RunSummary, Tracking

SITES = ["site-1", "site-2"]
CROSS_SITE = {
    "site-2": {"site-1": 0.61, "site-2": 0.72},
    GLOBAL_MODEL: {"site-1": 0.81, "site-2": 0.83},
    "site-1": {"site-1": 0.05},  # one cell missing
}
PREVIEW = os.environ.get("SPLEEN_PLOTS_PREVIEW")  # a folder to copy the PNGs into, to look at them


def _check_png(path: Path, size: tuple[int, int] | None = None, preview_as: str = "") -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size:
            assert abs(image.width - size[0]) <= 20 and abs(image.height - size[1]) <= 20, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 20, "image looks blank"
    if PREVIEW:
        Path(PREVIEW).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(PREVIEW) / (preview_as or path.name))


def _curves(site_offset: float) -> dict[str, list[tuple[int, float]]]:
    return {
        TRAIN_LOSS: [(e, 0.9 - 0.1 * e + site_offset) for e in range(6)],
        KEY_METRIC: [(e, 0.1 * e + site_offset) for e in range(6)],
        GLOBAL_METRIC: [(r, 0.2 * r + site_offset) for r in range(3)],
    }


def test_row_order_server_models_first_then_sorted():
    assert row_order(["site-2", "SRV_b", "site-1", "SRV_a"]) == ["SRV_a", "SRV_b", "site-1", "site-2"]
    assert row_order([]) == []


def test_heatmap_is_a_png_with_content(tmp_path):
    path = plot_cross_site_heatmap(CROSS_SITE, SITES, tmp_path / "sub" / "cross_site_heatmap.png", title="t")
    assert path == tmp_path / "sub" / "cross_site_heatmap.png"
    _check_png(path)


def test_learning_curves_png_size_and_missing_series(tmp_path):
    curves = {"site-1": _curves(0.0), "site-2": {**_curves(0.05), GLOBAL_METRIC: []}, "site-3": {}}
    path = plot_learning_curves(curves, tmp_path / "learning_curves.png", title="run x")
    assert path.is_file()
    _check_png(path, (1500, 450), preview_as="learning_curves_synthetic.png")


@pytest.fixture
def mlflow_runs(tmp_path) -> tuple[str, dict[str, str]]:
    """A real MLflow SQLite store with one run per site, metrics logged out of step order."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("plots", artifact_location=(tmp_path / "artifacts").as_uri())
    run_ids = {}
    for offset, site in enumerate(SITES):
        run_id = client.create_run(experiment_id, run_name=f"job {site}").info.run_id
        for step in (2, 0, 1):
            client.log_metric(run_id, TRAIN_LOSS, 1.0 - 0.2 * step, step=step)
            client.log_metric(run_id, KEY_METRIC, 0.2 * step + 0.05 * offset, step=step)
        for step in (1, 0):
            client.log_metric(run_id, GLOBAL_METRIC, 0.3 * step + 0.1 * offset, step=step)
        run_ids[site] = run_id
    return uri, run_ids


def test_site_curves_and_run_plots_from_a_real_mlflow_store(tmp_path, mlflow_runs):
    uri, run_ids = mlflow_runs
    curves = read_curves(RunSummary(tracking=Tracking(mlflow={"tracking_uri": uri, "run_ids": run_ids})))
    assert set(curves) == set(SITES)
    loss = curves["site-1"][TRAIN_LOSS]
    assert [s for s, _ in loss] == [0, 1, 2] and [v for _, v in loss] == pytest.approx([1.0, 0.8, 0.6])
    assert [s for s, _ in curves["site-2"][KEY_METRIC]] == [0, 1, 2]
    assert [(s, round(v, 6)) for s, v in curves["site-2"][GLOBAL_METRIC]] == [(0, 0.1), (1, 0.4)]
    one_site_ids = {"site-1": run_ids["site-1"]}
    one_site = read_curves(RunSummary(tracking=Tracking(mlflow={"tracking_uri": uri, "run_ids": one_site_ids})))
    assert one_site["site-1"].keys() == {TRAIN_LOSS, KEY_METRIC, GLOBAL_METRIC}

    tracking = Tracking(mlflow={"tracking_uri": uri, "run_ids": run_ids})
    summary = RunSummary(sites=SITES, cross_site=CROSS_SITE, tracking=tracking)
    written = write_run_plots(tmp_path / "run", summary)
    assert written == {
        "learning_curves": tmp_path / "run" / "learning_curves.png",
        "cross_site_heatmap": tmp_path / "run" / "cross_site_heatmap.png",
    }
    _check_png(written["learning_curves"], (1500, 450))
    _check_png(written["cross_site_heatmap"])


def test_run_plots_skip_what_has_no_data(tmp_path):
    empty = RunSummary(sites=SITES, tracking=Tracking(mlflow={"tracking_uri": "http://127.0.0.1:1", "run_ids": {}}))
    assert write_run_plots(tmp_path, empty) == {}
    assert list(tmp_path.iterdir()) == []
