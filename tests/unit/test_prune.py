"""``--keep results`` (spleen_tools/run/prune.py): after a successful run only the model copies go; the bundle,
summary, the server's final and best global models and every log stay; nothing outside the run directory is
touched, not even through a link inside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from spleen_tools.run.prune import prune_run
from spleen_tools.run.settings import ExperimentSettings, SettingsError

JOB = "4a6f0e"
SITE_DIR = "poc/example_project/prod_00/{site}/" + JOB + "/app_{site}"
COPIES = [
    f"poc/jobs-storage/{JOB}/workspace",  # NVFlare's job store: a zip of the server's job folder
    *(
        f"{SITE_DIR.format(site=site)}/{name}"
        for site in ("site-1", "site-2")
        for name in (
            "config/spleen_ct_segmentation/models/best_local_model.pt",
            "config/spleen_ct_segmentation/models/model.pt",
            "global_model/FL_global_model.pt",
            "local_model/last_update.pt",
        )
    ),
    *(
        f"job_result/{JOB}/workspace/cross_site_val/model_shareables/{name}"
        for name in ("SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", "site-1", "site-2")
    ),
]
RESULTS = [
    "summary.json",
    "cross_val_results.json",
    "model_bundle/spleen_ct_segmentation/models/model.pt",
    "model_bundle/spleen_ct_segmentation/models/model.ts",
    f"job_result/{JOB}/workspace/app_server/FL_global_model.pt",
    f"job_result/{JOB}/workspace/app_server/best_FL_global_model.pt",
    f"job_result/{JOB}/workspace/cross_site_val/cross_val_results.json",
    f"job_result/{JOB}/workspace/log.txt",
    f"poc/jobs-storage/{JOB}/meta",
    "poc/example_project/prod_00/site-1/log.txt",
    f"{SITE_DIR.format(site='site-1')}/../log.txt",
    f"{SITE_DIR.format(site='site-1')}/config/spleen_ct_segmentation/configs/train.json",
]


def _write(root: Path, names: list[str], size: int = 1000) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def test_only_the_model_copies_go(tmp_path):
    run = tmp_path / "run"
    _write(run, COPIES)
    _write(run, RESULTS, size=10)
    pruned = prune_run(run)
    assert (pruned.files, pruned.bytes) == (len(COPIES), 1000 * len(COPIES))
    assert all(not (run / name).exists() for name in COPIES)
    assert all((run / name).is_file() for name in RESULTS)
    assert prune_run(run).files == 0  # twice is harmless


def test_nothing_outside_the_run_directory_goes_not_even_through_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    _write(elsewhere, [f"{JOB}/app_site-3/global_model/FL_global_model.pt", "workspace"])
    run = tmp_path / "run"
    _write(run, COPIES[:1])
    site3 = run / "poc/example_project/prod_00/site-3"
    site3.parent.mkdir(parents=True, exist_ok=True)
    site3.symlink_to(elsewhere, target_is_directory=True)  # a linked site folder
    (run / f"poc/jobs-storage/{JOB}2").mkdir(parents=True)
    (run / f"poc/jobs-storage/{JOB}2/workspace").symlink_to(elsewhere / "workspace")  # a linked file
    assert prune_run(run).files == 1
    assert (elsewhere / f"{JOB}/app_site-3/global_model/FL_global_model.pt").is_file()
    assert (elsewhere / "workspace").is_file()


def test_keep_results_is_refused_with_keep_running():
    with pytest.raises(SettingsError, match="drop --keep-running"):
        ExperimentSettings(keep="results", keep_running=True).validate()
    with pytest.raises(SettingsError, match="--keep must be one of all, results"):
        ExperimentSettings(keep="models").validate()
