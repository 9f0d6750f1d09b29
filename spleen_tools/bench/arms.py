"""The study's arms on one :class:`StudyData`: centralized, local-only and an FL method (the real NVFlare simulator).

Centralized and local-only runs use the job's own bundle settings (train.json + cpu_quick override) in this
process, start from the FL job's initial model (the bundle network, seed 0) and validate after every epoch. The FL
arm is the local job with a method of jobs/algorithms (``JobSettings(algorithm=...)``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spleen_flare.bundle_runner import BundleRunner, build_network
from spleen_flare.contract import DATALIST_ENV
from spleen_tools.algorithms import load_algorithm
from spleen_tools.bench.study_data import Case, StudyData
from spleen_tools.jobs import QUICK_OVERRIDE, TRAIN_CONFIG, DPOptions, JobSettings, prepare_job
from spleen_tools.paths import BUNDLE_NAME, BUNDLE_SRC, OVERRIDES_SRC
from spleen_tools.run.progress import LogFollower, parse_event

Log = Callable[[str], None]
Weights = dict[str, torch.Tensor]
CONFIG_FILES = [TRAIN_CONFIG, QUICK_OVERRIDE]
INITIAL_MODEL_SEED = 0  # the FL job's persistor builds its initial global model with this seed
FL_JOB = "spleen_ct_segmentation_local"
CENTRALIZED, FEDAVG = "centralized", "FedAvg"


def local_name(site: str) -> str:
    return f"local {site}"


def method_name(method: str) -> str:
    """The model's name in the study: the method's own (``fedprox`` -> ``FedProx``)."""
    return load_algorithm(method)["name"]


def keeps_site_layers(method: str) -> bool:
    """FedBN: each site keeps its own BatchNorm layers, so the server's model is no model of its own (its BatchNorm
    layers are the initial ones): the study scores each site's copy of the last global model instead."""
    return load_algorithm(method).get("site_script_args", {}).get("fedbn") == "1"


class StudyError(RuntimeError):
    """An arm could not run (e.g. the simulator failed): the message names the log to read."""


@dataclass
class ArmResult:
    """Models an arm trained (name -> weights), its learning curves (name -> points) and timings; ``site_models``:
    a method's model as each site holds it (name -> {site: weights}; FedBN: with the site's BatchNorm layers)."""

    models: dict[str, Weights] = field(default_factory=dict)
    curves: dict[str, list[dict]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    site_models: dict[str, dict[str, Weights]] = field(default_factory=dict)


def copy_bundle(workdir: Path) -> Path:
    """A private copy of the bundle and its overrides (the runner writes models/ and eval/ inside it)."""
    target = Path(workdir) / "bundle"
    if target.exists():
        shutil.rmtree(target)
    ignore = shutil.ignore_patterns("models", "eval", "__pycache__")
    shutil.copytree(BUNDLE_SRC, target / BUNDLE_NAME, ignore=ignore)
    shutil.copytree(OVERRIDES_SRC, target / OVERRIDES_SRC.name, ignore=ignore)
    return target / BUNDLE_NAME


def quiet_engines(runner: BundleRunner) -> None:
    """The bundle logs every iteration at INFO; the study prints its own progress instead."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("monai", "ignite"))]
    for logger in [runner.trainer.logger, runner.evaluator.logger, *map(logging.getLogger, names)]:
        logger.setLevel(logging.WARNING)


def make_runner(
    workdir: Path,
    dataset_dir: Path,
    training: list[Case],
    validation: list[Case],
    config_files: list[str] = CONFIG_FILES,
) -> BundleRunner:
    """``config_files``: the arm's bundle configs (a DP arm's network has instance norm: the DP override last)."""
    bundle_root = copy_bundle(workdir)
    runner = BundleRunner(bundle_root, config_files, str(dataset_dir), training, validation)
    quiet_engines(runner)
    runner.set_weights(build_network(bundle_root, config_files, seed=INITIAL_MODEL_SEED).state_dict())
    return runner


def drop_checkpoints(runner: BundleRunner) -> None:
    """The bundle's own checkpoints (model.pt, best_local_model.pt) are not the study's models: the study keeps
    each arm's final weights itself, so these 19 MB files go."""
    shutil.rmtree(runner.ckpt_dir, ignore_errors=True)


def train_with_curve(runner: BundleRunner, epochs: int, label: str, log: Log) -> list[dict]:
    """Train one epoch at a time; the bundle validates after each (val_interval 1): Dice per epoch."""
    curve, every = [], max(1, epochs // 5)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        runner.train(1)
        dice = runner.last_local_metric
        curve.append({"epoch": epoch, "dice": round(dice, 4), "seconds": round(time.perf_counter() - start, 2)})
        if epoch % every == 0 or epoch == epochs:
            log(f"{label}: epoch {epoch}/{epochs}, validation Dice {dice:.4f}")
    return curve


def run_centralized(data: StudyData, epochs: int, workdir: Path, log: Log) -> ArmResult:
    """One runner on every site's training cases, validated on every site's validation cases."""
    start = time.perf_counter()
    runner = make_runner(workdir, data.root, data.all_training(), data.all_validation())
    curve = train_with_curve(runner, epochs, f"{data.setting} centralized", log)
    drop_checkpoints(runner)
    seconds = round(time.perf_counter() - start, 1)
    return ArmResult({CENTRALIZED: runner.get_weights()}, {CENTRALIZED: curve}, {CENTRALIZED: seconds})


def run_local(data: StudyData, epochs: int, workdir: Path, log: Log) -> ArmResult:
    """Each site alone on its own training cases, validated on its own validation cases."""
    result = ArmResult()
    for site, (training, validation) in data.sites.items():
        start = time.perf_counter()
        runner = make_runner(Path(workdir) / site, data.root, training, validation)
        name = local_name(site)
        result.curves[name] = train_with_curve(runner, epochs, f"{data.setting} {name}", log)
        result.models[name] = runner.get_weights()
        drop_checkpoints(runner)
        result.seconds[name] = round(time.perf_counter() - start, 1)
        del runner
    return result


def run_fl(
    data: StudyData,
    method: str,
    rounds: int,
    local_epochs: int,
    workdir: Path,
    tracking_uri: str,
    log: Log,
    experiment: str = "validity",
    timeout: float = 1800.0,
    dp: DPOptions | None = None,
    name: str | None = None,
) -> ArmResult:
    """The local job with ``method`` in the NVFlare simulator over the sites' datalists: the final global model
    (FedBN: the sites' own scores of it) and the global model's Dice per round, from the sites' ``[spleen]`` lines."""
    from spleen_tools.systems.simulator import run_simulator

    workdir = Path(workdir).resolve()
    sites, name = data.site_names, name or method_name(method)
    settings = JobSettings(
        rounds=rounds,
        local_epochs=local_epochs,
        min_clients=len(sites),
        quick=True,
        tracking_uri=tracking_uri,
        experiment_name=experiment,
        ship_code=True,  # the simulator has no site policies: it admits our classes only in a job's own code
        algorithm=method,
        dp=dp,
    )
    job = prepare_job(FL_JOB, workdir / "jobs", settings)
    workspace = workdir / "workspace"
    start = time.perf_counter()
    # The sites read the study's datalists; the variable wins over any value the user has set.
    datalists = {DATALIST_ENV: str(data.datalist_dir / "{site}.json")}
    with _watch(workspace, sites, rounds, name, log):
        result = run_simulator(job, workspace, len(sites), data.root, timeout=timeout, env=datalists)
    seconds = round(time.perf_counter() - start, 1)
    info = {"method": method, "returncode": result.returncode, "workspace": str(workspace), "log": str(result.log_path)}
    if result.returncode != 0 or not result.global_model_path.is_file():
        raise StudyError(
            f"{data.setting} {name}: the simulator failed (exit {result.returncode}); see {result.log_path}"
        )
    logs = [result.log_path, *sorted(workspace.glob("site-*/log.txt"))]
    events = read_events(logs)
    info["sites_final_dice"] = final_dice(events, sites)  # each site's own score of the last global model
    info |= round_costs(events, local_epochs)
    arm = ArmResult(curves=fl_curves(events, sites, local_epochs, name), seconds={name: seconds}, info=info)
    if keeps_site_layers(method):
        arm.site_models[name] = load_site_copies(logs, sites, f"{data.setting} {name}")
    else:
        arm.models[name] = _load(result.global_model_path)
    return arm


def round_costs(events: list[dict], local_epochs: int) -> dict:
    """From the sites' round lines: the slowest site's seconds per local epoch (its global-model validation, training
    and per-epoch validation, over ``local_epochs``), mean over rounds; with DP, each site's epsilon at the end."""
    rounds: dict[int, list[dict]] = {}
    for event in events:
        if event.get("kind") == "round" and isinstance(event.get("work_s"), int | float):
            rounds.setdefault(event["round"], []).append(event)
    slowest = [max(e["work_s"] for e in per_site) / local_epochs for per_site in rounds.values()]
    out: dict = {"site_epoch_s": round(sum(slowest) / len(slowest), 2) if slowest else None}
    last = {e["site"]: e for r in sorted(rounds) for e in rounds[r] if "dp_epsilon" in e}
    if last:
        out["dp_epsilon"] = {s: e["dp_epsilon"] for s, e in sorted(last.items())}
        out["dp_noise_multiplier"] = {s: e.get("dp_noise_multiplier") for s, e in sorted(last.items())}
    return out


def _load(path: Path) -> Weights:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def load_site_copies(logs: list[Path], sites: list[str], label: str) -> dict[str, Weights]:
    """Each site's copy of the last global model (FedBN: with its own BatchNorm layers), where its log says."""
    copies = kept_copies(logs, sites)
    missing = [site for site in sites if site not in copies or not copies[site].is_file()]
    if missing:
        raise StudyError(f"{label}: {missing[0]} kept no copy of the final global model; see {logs[0]}")
    return {site: _load(copies[site]) for site in sites}


@contextmanager
def _watch(workspace: Path, sites: list[str], rounds: int, name: str, log: Log) -> Iterator[None]:
    """Print the sites' round lines while the simulator runs (a thread polls their logs)."""
    import threading

    stop = threading.Event()
    follower = LogFollower([workspace / site for site in sites], patterns=("log.txt",))
    seen: set[tuple] = set()

    def poll() -> None:
        while not stop.wait(5.0):
            for line in follower.poll():
                event = parse_event(line)
                if event and event.get("kind") == "round" and (event["site"], event["round"]) not in seen:
                    seen.add((event["site"], event["round"]))
                    log(
                        f"{name} round {event['round'] + 1}/{rounds} {event['site']}: global model Dice "
                        f"{event.get('global_dice')}, after local training {event.get('local_dice')}"
                    )

    thread = threading.Thread(target=poll, name="fl-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _log_events(paths: list[Path]) -> Iterator[dict]:
    """The progress events of log files that exist, in order."""
    for path in paths:
        if Path(path).is_file():
            for line in Path(path).read_text(errors="replace").splitlines():
                event = parse_event(line)
                if event:
                    yield event


def read_events(paths: list[Path]) -> list[dict]:
    """Round and final events from log files, each (kind, site, round) once (a line shows up in several logs)."""
    events, seen = [], set()
    for event in _log_events(paths):
        if event.get("kind") not in ("round", "final"):
            continue
        key = (event["kind"], event["site"], event["round"])
        if key not in seen:
            seen.add(key)
            events.append(event)
    return events


def kept_copies(paths: list[Path], sites: list[str]) -> dict[str, Path]:
    """Where each site kept its copy of the last global model (its ``final_global_model`` line)."""
    return {
        event["site"]: Path(event["final_global_model"])
        for event in _log_events(paths)
        if event.get("kind") == "info" and event["site"] in sites and event.get("final_global_model")
    }


def final_dice(events: list[dict], sites: list[str]) -> dict[str, float]:
    """Each site's score of the last global model on its validation cases (its ``final`` line)."""
    return {
        event["site"]: round(float(event["global_dice"]), 4)
        for event in events
        if event.get("kind") == "final"
        and event.get("site") in sites
        and isinstance(event.get("global_dice"), int | float)
    }


def fl_curves(events: list[dict], sites: list[str], local_epochs: int, name: str = FEDAVG) -> dict[str, list[dict]]:
    """The global model's Dice per round: at round r a site scores the model after r aggregations (round 0: the
    initial model; the final validation scores the last one). ``name`` = mean over sites; one curve per site."""
    per_round: dict[int, dict[str, float]] = {}
    for event in events:
        dice = event.get("global_dice")
        if isinstance(dice, int | float):
            per_round.setdefault(int(event["round"]), {})[event["site"]] = float(dice)
    curves: dict[str, list[dict]] = {name: []}
    for site in sites:
        curves[f"{name} on {site}"] = []
    for rnd in sorted(per_round):
        scores = per_round[rnd]
        epoch = rnd * local_epochs
        if set(scores) >= set(sites):
            mean = sum(scores[s] for s in sites) / len(sites)
            curves[name].append({"round": rnd, "epoch": epoch, "dice": round(mean, 4)})
        for site, dice in scores.items():
            if site in sites:
                curves[f"{name} on {site}"].append({"round": rnd, "epoch": epoch, "dice": round(dice, 4)})
    return curves
