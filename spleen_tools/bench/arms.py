"""The study's three arms on one :class:`StudyData`: centralized, local-only and FedAvg (the real NVFlare simulator).

Centralized and local-only runs use the job's own bundle settings (train.json + cpu_quick override) in this
process, start from the FedAvg job's initial model (the bundle network, seed 0) and validate after every epoch.
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
from spleen_tools.bench.study_data import Case, StudyData
from spleen_tools.jobs import QUICK_OVERRIDE, TRAIN_CONFIG, JobSettings, prepare_job
from spleen_tools.paths import BUNDLE_NAME, BUNDLE_SRC, OVERRIDES_SRC
from spleen_tools.run.progress import LogFollower, parse_event

Log = Callable[[str], None]
Weights = dict[str, torch.Tensor]
CONFIG_FILES = [TRAIN_CONFIG, QUICK_OVERRIDE]
INITIAL_MODEL_SEED = 0  # the FedAvg job's persistor builds its initial global model with this seed
FEDAVG_JOB = "spleen_ct_segmentation_local"
CENTRALIZED, FEDAVG = "centralized", "FedAvg"


def local_name(site: str) -> str:
    return f"local {site}"


class StudyError(RuntimeError):
    """An arm could not run (e.g. the simulator failed): the message names the log to read."""


@dataclass
class ArmResult:
    """Models an arm trained (name -> weights), its learning curves (name -> points) and timings."""

    models: dict[str, Weights] = field(default_factory=dict)
    curves: dict[str, list[dict]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


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


def make_runner(workdir: Path, dataset_dir: Path, training: list[Case], validation: list[Case]) -> BundleRunner:
    bundle_root = copy_bundle(workdir)
    runner = BundleRunner(bundle_root, CONFIG_FILES, str(dataset_dir), training, validation)
    quiet_engines(runner)
    runner.set_weights(build_network(bundle_root, [TRAIN_CONFIG], seed=INITIAL_MODEL_SEED).state_dict())
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


def run_fedavg(
    data: StudyData,
    rounds: int,
    local_epochs: int,
    workdir: Path,
    tracking_uri: str,
    log: Log,
    experiment: str = "validity",
    timeout: float = 1800.0,
) -> ArmResult:
    """The local FedAvg job in the NVFlare simulator over the sites' datalists; the final global model and
    the global model's Dice per round, from the sites' ``[spleen]`` lines."""
    from spleen_tools.systems.simulator import run_simulator

    workdir = Path(workdir).resolve()
    sites = data.site_names
    settings = JobSettings(
        rounds=rounds,
        local_epochs=local_epochs,
        min_clients=len(sites),
        quick=True,
        tracking_uri=tracking_uri,
        experiment_name=experiment,
        ship_code=True,  # the simulator has no site policies: it admits our classes only in a job's own code
    )
    job = prepare_job(FEDAVG_JOB, workdir / "jobs", settings)
    workspace = workdir / "workspace"
    start = time.perf_counter()
    # The sites read the study's datalists; the variable wins over any value the user has set.
    datalists = {DATALIST_ENV: str(data.datalist_dir / "{site}.json")}
    with _watch(workspace, sites, rounds, log):
        result = run_simulator(job, workspace, len(sites), data.root, timeout=timeout, env=datalists)
    seconds = round(time.perf_counter() - start, 1)
    info = {"returncode": result.returncode, "workspace": str(workspace), "log": str(result.log_path)}
    if result.returncode != 0 or not result.global_model_path.is_file():
        raise StudyError(
            f"{data.setting} FedAvg: the simulator failed (exit {result.returncode}); see {result.log_path}"
        )
    events = read_events([result.log_path, *sorted(workspace.glob("site-*/log.txt"))])
    weights = torch.load(result.global_model_path, map_location="cpu", weights_only=True)["model"]
    return ArmResult({FEDAVG: weights}, fedavg_curves(events, sites, local_epochs), {FEDAVG: seconds}, info)


@contextmanager
def _watch(workspace: Path, sites: list[str], rounds: int, log: Log) -> Iterator[None]:
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
                        f"FedAvg round {event['round'] + 1}/{rounds} {event['site']}: global model Dice "
                        f"{event.get('global_dice')}, after local training {event.get('local_dice')}"
                    )

    thread = threading.Thread(target=poll, name="fedavg-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def read_events(paths: list[Path]) -> list[dict]:
    """Round and final events from log files, each (kind, site, round) once (a line shows up in several logs)."""
    events, seen = [], set()
    for path in paths:
        if not Path(path).is_file():
            continue
        for line in Path(path).read_text(errors="replace").splitlines():
            event = parse_event(line)
            if not event or event.get("kind") not in ("round", "final"):
                continue
            key = (event["kind"], event["site"], event["round"])
            if key not in seen:
                seen.add(key)
                events.append(event)
    return events


def fedavg_curves(events: list[dict], sites: list[str], local_epochs: int) -> dict[str, list[dict]]:
    """The global model's Dice per round: at round r a site scores the model after r aggregations (round 0: the
    initial model; the final validation scores the last one). ``FedAvg`` = mean over sites; one curve per site."""
    per_round: dict[int, dict[str, float]] = {}
    for event in events:
        dice = event.get("global_dice")
        if isinstance(dice, int | float):
            per_round.setdefault(int(event["round"]), {})[event["site"]] = float(dice)
    curves: dict[str, list[dict]] = {FEDAVG: []}
    for site in sites:
        curves[f"{FEDAVG} on {site}"] = []
    for rnd in sorted(per_round):
        scores = per_round[rnd]
        epoch = rnd * local_epochs
        if set(scores) >= set(sites):
            mean = sum(scores[s] for s in sites) / len(sites)
            curves[FEDAVG].append({"round": rnd, "epoch": epoch, "dice": round(mean, 4)})
        for site, dice in scores.items():
            if site in sites:
                curves[f"{FEDAVG} on {site}"].append({"round": rnd, "epoch": epoch, "dice": round(dice, 4)})
    return curves
