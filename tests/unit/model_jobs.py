"""A downloaded job as ``nvflare job download`` gives it (no NVFlare run needed): for export and segment tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from spleen_tools.paths import BUNDLE_NAME, BUNDLE_SRC, OVERRIDES_SRC

JOB_ID = "0f0e0d0c-1111-2222-3333-444455556666"
SCRIPT_ARGS = "--local_epochs 5 --config_files configs/train.json,../overrides/cpu_quick.json"


def bundle_network():
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_SRC / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


def make_downloaded_job(root: Path, weights: dict | None = None, with_job_definition: bool = True) -> Path:
    """``root/<job id>/``: meta.json, the job definition (bundle + CPU-quick override), the server's final and
    best model (different weights), the model history of 3 rounds and cross-site results (final model 0.9 / 0.8
    on two sites)."""
    job = root / JOB_ID
    server = job / "workspace" / "app_server"
    server.mkdir(parents=True)
    if weights is None:
        torch.manual_seed(0)
        weights = bundle_network().state_dict()
    # the best model differs from the final one, so that exporting the wrong one shows
    best = {k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()}
    torch.save({"model": weights, "train_conf": {"train": {"model": "UNet"}}}, server / "FL_global_model.pt")
    torch.save({"model": best, "train_conf": {}}, server / "best_FL_global_model.pt")
    (job / "meta.json").write_text(json.dumps({"job_id": JOB_ID, "name": "spleen_ct_segmentation_local"}))
    history = [{"round": "initial", "sha256": "a"}] + [{"round": r, "sha256": f"r{r}"} for r in range(3)]
    history.append({"round": 1, "sha256": "r1", "best": True, "val_mean_dice": 0.5})
    (server / "global_model_history.json").write_text(json.dumps(history))
    results = {
        site: {"SRV_FL_global_model.pt": {"val_mean_dice": d}, "SRV_best_FL_global_model.pt": {"val_mean_dice": 0.5}}
        for site, d in (("site-1", 0.9), ("site-2", 0.8))
    }
    (job / "workspace" / "cross_site_val").mkdir()
    (job / "workspace" / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(results))
    if with_job_definition:
        config = job / "job" / "tmpjob" / "app" / "config"
        shutil.copytree(BUNDLE_SRC, config / BUNDLE_NAME)
        shutil.copytree(OVERRIDES_SRC, config / "overrides")
        executor = {"executor": {"args": {"task_script_args": SCRIPT_ARGS}}}
        (config / "config_fed_client.json").write_text(json.dumps({"executors": [executor]}))
    return job
