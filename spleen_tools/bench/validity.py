"""The validity study: does FedAvg reach what centralized training reaches, and beat training alone?

For each data setting (IID, non-IID, contrast phase: ``study_data``) on the same data, the same bundle settings
(cpu_quick) and the same number of epochs E = rounds x local epochs: (a) centralized training on all sites' training
cases, (b) each site alone, (c) FedAvg in the real NVFlare simulator. Every model is scored on every site's
validation cases and on held-out cases; results go to ``validity.json``, ``validity.md`` and one learning-curve PNG
per arm and setting. The arms run one after another, each with the machine's cores (the simulator's sites share
them).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spleen_tools.bench.arms import FEDAVG, ArmResult, StudyError, run_centralized, run_fedavg, run_local
from spleen_tools.bench.score import eval_sets, score_models
from spleen_tools.bench.study_data import make_study_data
from spleen_tools.bench.study_plots import plot_arm_curves
from spleen_tools.bench.study_report import check_expectations, markdown_section, score_table
from spleen_tools.bench.study_settings import CENTRALIZED_TOLERANCE, ValiditySettings
from spleen_tools.jobs import QUICK_OVERRIDE, TRAIN_CONFIG
from spleen_tools.mlflow_server import MLflowServer

Log = Callable[[str], None]
ARMS = ("centralized", "local", "fedavg")
TITLES = {"centralized": "centralized", "local": "local-only", "fedavg": "FedAvg (global model)"}
# What each curve was validated on, for the legends.
LEGEND_SUFFIX = {"centralized": " (all sites' val)", "local": " (own val)", "fedavg": ""}


def run_validity(settings: ValiditySettings, out_dir: Path, log: Log = print) -> dict:
    """Run every data setting and write the study's files into ``out_dir``; returns what validity.json holds."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    start = time.perf_counter()
    study = {
        "study": "validity",
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "settings": _settings_dict(settings, threads),
        "results": {},
    }
    with MLflowServer(out_dir / "work" / "mlflow") as server:  # the job's MLflowReceiver reports to it
        for setting in settings.settings:
            study["results"][setting] = run_setting(setting, settings, out_dir, server.url, log)
            study["seconds"] = round(time.perf_counter() - start, 1)
            write_outputs(study, out_dir)
    return study


def _settings_dict(settings: ValiditySettings, threads: int) -> dict:
    return {
        "rounds": settings.rounds,
        "local_epochs": settings.local_epochs,
        "epochs": settings.epochs,
        "sites": settings.sites,
        "settings": list(settings.settings),
        "seed": settings.seed,
        "tiny": settings.tiny,
        "bundle_config_files": [TRAIN_CONFIG, QUICK_OVERRIDE],
        "threads": {"in_process_arms": threads, "simulator_site": max(1, threads // settings.sites)},
        "centralized_tolerance": CENTRALIZED_TOLERANCE,
    }


def run_setting(setting: str, settings: ValiditySettings, out_dir: Path, tracking_uri: str, log: Log) -> dict:
    """Data, the three arms, the scores, the expectations check and the curve PNGs of one data setting."""
    work = out_dir / "work" / setting
    t0 = time.perf_counter()
    data = make_study_data(setting, work / "data", settings.sites, settings.seed, settings.tiny)
    seconds = {"data": round(time.perf_counter() - t0, 1)}
    log(f"{setting}: data in {work / 'data'} ({_describe_counts(data.describe())})")
    arms: dict[str, ArmResult] = {}
    errors: dict[str, str] = {}
    arms["centralized"] = run_centralized(data, settings.epochs, work / "centralized", log)
    arms["local"] = run_local(data, settings.epochs, work / "local", log)
    try:
        experiment = f"validity-{setting}-{out_dir.name}"
        arms["fedavg"] = run_fedavg(
            data,
            settings.rounds,
            settings.local_epochs,
            work / "fedavg",
            tracking_uri,
            log,
            experiment,
            settings.fedavg_timeout,
        )
    except StudyError as err:  # reported in the results; the other arms still count
        log(f"error: {err}")
        errors["fedavg"] = str(err)
    models = {name: weights for arm in arms.values() for name, weights in arm.models.items()}
    _save_models(models, work / "models")
    t1 = time.perf_counter()
    scores = score_models(models, eval_sets(data), data.root, work / "scoring", log)
    seconds.update({name: s for arm in arms.values() for name, s in arm.seconds.items()})
    seconds["scoring"] = round(time.perf_counter() - t1, 1)
    sites = data.site_names
    plots = {arm: str(_plot(setting, arm, result, out_dir)) for arm, result in arms.items()}
    return {
        "data": data.describe(),
        "sites": sites,
        "columns": [*sites, "held_out"],
        "scores": scores,
        "table": score_table(scores, sites),
        "expectations": check_expectations(scores, sites),
        "curves": {arm: result.curves for arm, result in arms.items()},
        "epoch_seconds": _epoch_seconds(arms),
        "seconds": seconds,
        "plots": plots,
        "fedavg": arms["fedavg"].info if "fedavg" in arms else {},
        "errors": errors,
    }


def _plot(setting: str, arm: str, result: ArmResult, out_dir: Path) -> Path:
    labels = {name: name + LEGEND_SUFFIX[arm] for name in result.curves}
    labels[FEDAVG] = f"{FEDAVG} (mean over sites' val)"
    return plot_arm_curves(result.curves, out_dir / f"{setting}_{arm}_curves.png", f"{setting}: {TITLES[arm]}", labels)


def _describe_counts(described: dict) -> str:
    parts = [f"{s}: {d['training']} training + {d['validation']} validation" for s, d in described["sites"].items()]
    return ", ".join(parts) + f", held-out {described['held_out']}"


def _epoch_seconds(arms: dict[str, ArmResult]) -> dict[str, float]:
    """Mean seconds per epoch (training + its validation) of each in-process curve."""
    out = {}
    for arm in arms.values():
        for name, points in arm.curves.items():
            times = [p["seconds"] for p in points if "seconds" in p]
            if times:
                out[name] = round(sum(times) / len(times), 2)
    return out


def _save_models(models: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, weights in models.items():
        torch.save({"model": weights}, folder / f"{name.replace(' ', '_')}.pt")


def _strict(value):
    """NaN/inf -> None, so validity.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def markdown_report(study: dict) -> str:
    s = study["settings"]
    lines = [
        "# Validity study: centralized vs local-only vs FedAvg",
        "",
        f"Same data, bundle settings (cpu_quick) and epochs per arm: E = {s['rounds']} rounds x {s['local_epochs']} "
        f"local epochs = {s['epochs']} epochs; {s['sites']} sites; seed {s['seed']}"
        + ("; tiny smoke-run data" if s["tiny"] else "")
        + ". Dice of the final model of each arm; 'mean' is over the sites' validation columns.",
    ]
    for setting, result in study["results"].items():
        lines += ["", markdown_section(setting, result)]
        if result.get("errors"):
            lines += ["", "Errors: " + "; ".join(f"{arm}: {msg}" for arm, msg in result["errors"].items())]
    return "\n".join(lines) + "\n"


def write_outputs(study: dict, out_dir: Path) -> dict[str, Path]:
    paths = {"json": out_dir / "validity.json", "md": out_dir / "validity.md"}
    paths["json"].write_text(json.dumps(_strict(study), indent=2) + "\n")
    paths["md"].write_text(markdown_report(study))
    return paths
