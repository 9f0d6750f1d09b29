"""The validity study: do FL methods reach what centralized training reaches, and beat training alone?

For each data setting (IID, non-IID, contrast phase: ``study_data``) and each data seed, on the same data, the same
bundle settings (cpu_quick) and the same number of epochs E = rounds x local epochs: (a) centralized training on
all sites' training cases, (b) each site alone, (c) each FL method (jobs/algorithms) in the real NVFlare simulator.
Every model is scored on every site's validation cases and on held-out cases; across seeds, each score's mean and
range. Results go to ``validity.json``, ``validity.md``, a Dice chart per setting and a learning-curve PNG per arm,
seed and setting. The arms run one after another, each with the machine's cores (the simulator's sites share them).
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

from spleen_tools.bench.arms import (
    ArmResult,
    StudyError,
    keeps_site_layers,
    method_name,
    run_centralized,
    run_fl,
    run_local,
)
from spleen_tools.bench.score import eval_sets, score_models
from spleen_tools.bench.study_checks import check_expectations, method_verdicts, phase_goal
from spleen_tools.bench.study_data import StudyData, make_study_data
from spleen_tools.bench.study_plots import plot_arm_curves, plot_summary
from spleen_tools.bench.study_report import markdown_report
from spleen_tools.bench.study_settings import CENTRALIZED_TOLERANCE, ValiditySettings
from spleen_tools.bench.study_tables import (
    HELD_OUT,
    MEAN,
    Scores,
    copy_name,
    mean_table,
    score_table,
    site_copies_row,
    summarize,
)
from spleen_tools.jobs import QUICK_OVERRIDE, TRAIN_CONFIG
from spleen_tools.mlflow_server import MLflowServer

Log = Callable[[str], None]
FORMAT = 2  # validity.json: results per setting hold "seeds" (format 1, one seed: the seed's result itself)
PHASE_SETTING = "phase"
TITLES = {"centralized": "centralized", "local": "local-only"}
# What each curve was validated on, for the legends.
LEGEND_SUFFIX = {"centralized": " (all sites' val)", "local": " (own val)"}


def run_validity(settings: ValiditySettings, out_dir: Path, log: Log = print) -> dict:
    """Run every data setting and seed and write the study's files into ``out_dir`` (again after each seed);
    returns what validity.json holds."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    start = time.perf_counter()
    study = {
        "study": "validity",
        "format": FORMAT,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "settings": _settings_dict(settings, threads),
        "results": {},
    }
    with MLflowServer(out_dir / "work" / "mlflow") as server:  # the job's MLflowReceiver reports to it
        for setting in settings.settings:
            runs: dict[str, dict] = {}
            for seed in settings.seeds:
                runs[str(seed)] = run_seed(setting, seed, settings, out_dir, server.url, log)
                study["results"][setting] = combine_seeds(setting, runs, settings, out_dir)
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
        "seeds": list(settings.seeds),
        "methods": list(settings.methods),
        "method_names": {method: method_name(method) for method in settings.methods},
        "tiny": settings.tiny,
        "bundle_config_files": [TRAIN_CONFIG, QUICK_OVERRIDE],
        "threads": {"in_process_arms": threads, "simulator_site": max(1, threads // settings.sites)},
        "centralized_tolerance": CENTRALIZED_TOLERANCE,
    }


def run_seed(setting: str, seed: int, settings: ValiditySettings, out_dir: Path, tracking_uri: str, log: Log) -> dict:
    """Data, the arms (an FL arm per method), the scores, each method's check and the curve PNGs of one seed."""
    work = out_dir / "work" / setting / f"seed-{seed}"
    t0 = time.perf_counter()
    data = make_study_data(setting, work / "data", settings.sites, seed, settings.tiny)
    seconds = {"data": round(time.perf_counter() - t0, 1)}
    log(f"{setting} seed {seed}: data in {work / 'data'} ({_describe_counts(data.describe())})")
    arms: dict[str, ArmResult] = {
        "centralized": run_centralized(data, settings.epochs, work / "centralized", log),
        "local": run_local(data, settings.epochs, work / "local", log),
    }
    experiment = f"validity-{setting}-seed-{seed}-{out_dir.name}"
    fl_arms, errors = _run_methods(data, settings, work, tracking_uri, experiment, log)
    arms |= fl_arms
    t1 = time.perf_counter()
    scores, site_copies = _score(arms, data, work, log)
    seconds.update({name: s for arm in arms.values() for name, s in arm.seconds.items()})
    seconds["scoring"] = round(time.perf_counter() - t1, 1)
    sites, names = data.site_names, [method_name(m) for m in settings.methods]
    return {
        "seed": seed,
        "data": data.describe(),
        "sites": sites,
        "columns": [*sites, HELD_OUT],
        "scores": scores,
        "site_copies": site_copies,
        "table": score_table(scores, sites, names),
        "expectations": {name: check_expectations(scores, sites, name) for name in names},
        "curves": {arm: result.curves for arm, result in arms.items()},
        "epoch_seconds": _epoch_seconds(arms),
        "seconds": seconds,
        "plots": {arm: str(_plot(setting, seed, arm, result, out_dir)) for arm, result in arms.items()},
        "fl": {method: arms[method].info for method in settings.methods if method in arms},
        "errors": errors,
    }


def _run_methods(
    data: StudyData, settings: ValiditySettings, work: Path, tracking_uri: str, experiment: str, log: Log
) -> tuple[dict[str, ArmResult], dict[str, str]]:
    """An FL arm per method; a method that fails is reported (``{method: message}``), the others still count."""
    arms, errors = {}, {}
    for method in settings.methods:
        try:
            arms[method] = run_fl(
                data,
                method,
                settings.rounds,
                settings.local_epochs,
                work / method,
                tracking_uri,
                log,
                experiment=experiment,
                timeout=settings.fl_timeout,
            )
        except StudyError as err:
            log(f"error: {err}")
            errors[method] = str(err)
    return arms, errors


def _score(arms: dict[str, ArmResult], data: StudyData, work: Path, log: Log) -> tuple[Scores, dict[str, Scores]]:
    """Every model (and every site's copy of a method's model) on every evaluation set, the models kept in
    ``work/models``; a method held in copies becomes one row (``site_copies_row``), its copies' scores returned
    beside (``{method: {site: {column: Dice}}}``)."""
    models = {name: weights for arm in arms.values() for name, weights in arm.models.items()}
    held = {name: per_site for arm in arms.values() for name, per_site in arm.site_models.items()}
    copies = {copy_name(name, site): w for name, per_site in held.items() for site, w in per_site.items()}
    _save_models(models | copies, work / "models")
    scored = score_models(models | copies, eval_sets(data), data.root, work / "scoring", log)
    scores = {name: scored[name] for name in models}
    site_copies = {name: {site: scored[copy_name(name, site)] for site in per_site} for name, per_site in held.items()}
    scores |= {name: site_copies_row(rows, data.site_names) for name, rows in site_copies.items()}
    return scores, site_copies


def combine_seeds(setting: str, runs: dict[str, dict], settings: ValiditySettings, out_dir: Path) -> dict:
    """A setting's seeds side by side: every score's mean and range over them, each method's verdict (a conclusion
    only where the seeds agree), the phase question's answer (phase setting) and the Dice chart."""
    sites = next(iter(runs.values()))["sites"]
    names = [method_name(m) for m in settings.methods]
    summary = summarize({seed: run["table"] for seed, run in runs.items()}, [*sites, HELD_OUT, MEAN])
    table = mean_table(summary, sites, names)
    verdicts = method_verdicts({seed: run["expectations"] for seed, run in runs.items()}, names)
    title = f"{setting}: Dice of the final models, mean over seed(s) {', '.join(runs)} (whiskers: lowest to highest)"
    chart = plot_summary(
        summary, [row["model"] for row in table], [*sites, HELD_OUT], out_dir / f"{setting}_dice.png", title
    )
    result = {
        "sites": sites,
        "columns": [*sites, HELD_OUT],
        "methods": {m: method_name(m) for m in settings.methods},
        "held_by_sites": [method_name(m) for m in settings.methods if keeps_site_layers(m)],
        "seeds": runs,
        "summary": summary,
        "table": table,
        "verdicts": verdicts,
        "plots": {"dice": str(chart)},
        "errors": {seed: run["errors"] for seed, run in runs.items() if run["errors"]},
    }
    if setting == PHASE_SETTING:
        result["phase_goal"] = phase_goal(verdicts)
    return result


def _plot(setting: str, seed: int, arm: str, result: ArmResult, out_dir: Path) -> Path:
    """An arm's learning curves; an FL arm's curves are its global model's (mean over the sites and per site)."""
    if arm in TITLES:
        labels, title = {name: name + LEGEND_SUFFIX[arm] for name in result.curves}, TITLES[arm]
    else:
        name = method_name(arm)
        held = ", each site with its own BatchNorm layers" if keeps_site_layers(arm) else ""
        labels, title = {name: f"{name} (mean over sites' val)"}, f"{name} (global model{held})"
    path = out_dir / f"{setting}_seed-{seed}_{arm}_curves.png"
    return plot_arm_curves(result.curves, path, f"{setting}, seed {seed}: {title}", labels)


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


def write_outputs(study: dict, out_dir: Path) -> dict[str, Path]:
    paths = {"json": out_dir / "validity.json", "md": out_dir / "validity.md"}
    paths["json"].write_text(json.dumps(_strict(study), indent=2) + "\n")
    paths["md"].write_text(markdown_report(study))
    return paths
