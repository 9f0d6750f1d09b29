"""Prepare job folders: place the bundle, and set FL knobs in a job copy.

The bundle (``bundles/spleen_ct_segmentation``) and its override files (``bundles/overrides``) live once in the
repo; this module copies them into each job's ``app/config/`` (git-ignored), where every participant checks them
against its own installed copy. The job side (``spleen_flare``) is installed at each participant and never travels
in a job, but for ``ship_code`` (a development switch for POC: the code in ``app/custom/``, which makes the job
bring-your-own-code, refused by the sites' default policy). Knobs such as rounds and local epochs are written into
a *copy* of the job (e.g. under a run directory), so the job folders in git keep their documented defaults.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from spleen_flare import __version__
from spleen_flare.contract import DP_OVERRIDE_FILE, JOB_ID_PATTERN, JOB_VERSION_KEY
from spleen_flare.site_install import BUNDLE_IGNORED, BUNDLE_IGNORED_SUFFIXES
from spleen_tools.algorithms import apply_algorithm
from spleen_tools.paths import BUNDLE_NAME, BUNDLE_SRC, JOB_SIDE_SRC, JOBS_DIR, OVERRIDES_SRC

# The job folders under jobs/, by the short name the one command takes (--job local|he): the one registry.
STATS_JOB = "spleen_ct_statistics"  # federated statistics of the sites' CT (no training, no bundle)
JOB_VARIANTS = {"local": "spleen_ct_segmentation_local", "he": "spleen_ct_segmentation_he", "stats": STATS_JOB}
JOB_NAMES = tuple(JOB_VARIANTS.values())
STATS_PRIVACY_FILTER = "spleen_flare.stats_privacy.CTStatisticsPrivacy"
QUICK_OVERRIDE = "../overrides/cpu_quick.json"
TRAIN_CONFIG = "configs/train.json"
# Where the server's receiver writes the sites' metrics: an MLflow server (the job's MLflowReceiver with its
# tracking_uri), an MLflow SQLite store in the job's result folder (no tracking_uri: NVFlare 2.9 writes
# <result>/mlflow.db, downloaded with the job), or TensorBoard event files per site (NVFlare's TBAnalyticsReceiver,
# <job workspace>/tb_events/<site>/), or W&B runs per site (spleen_flare.wandb_receiver, offline unless a
# W&B project is given and the server has an API key: <job workspace>/wandb_runs/, downloaded with the job).
TRACKING_MODES = ("server", "workspace", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online")
MLFLOW_RECEIVER_ID = "mlflow_receiver"
TB_FOLDER = "tb_events"
TB_RECEIVER = {
    "id": "tb_receiver",
    "path": "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
    "args": {"tb_folder": TB_FOLDER, "events": ["fed.analytix_log_stats"]},
}
WANDB_RECEIVER_PATH = "spleen_flare.wandb_receiver.JobWandBReceiver"
# Run-time outputs of a bundle that must never travel with a job (nor count when a participant compares bundles).
_BUNDLE_IGNORE = shutil.ignore_patterns(*BUNDLE_IGNORED, *(f"*{s}" for s in BUNDLE_IGNORED_SUFFIXES))
CUSTOM_DIR = "custom"  # NVFlare's folder of a job's own code: its presence makes the job bring-your-own-code


@dataclass(frozen=True)
class DPOptions:
    """DP-SGD at the sites (``spleen_flare.dp``, which checks them): a target epsilon for the whole job or a noise
    multiplier, the per-case clipping norm, delta, and an epsilon the sites stop before passing (default: the
    target)."""

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float | None = None

    def problems(self) -> list[str]:
        out = []
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            out.append("DP needs a target epsilon (--dp EPSILON) or a noise multiplier (--dp-noise SIGMA), not both")
        for name, value in vars(self).items():
            if value is not None and not value > 0:
                out.append(f"DP {name.replace('_', ' ')} must be positive, got {value}")
        if not self.delta < 1:
            out.append(f"DP delta must be below 1, got {self.delta}")
        return out

    def script_args(self) -> dict[str, str]:
        """The sites' training script options (``spleen_flare.client_train``)."""
        args = {"dp_max_grad_norm": self.max_grad_norm, "dp_delta": self.delta}
        for key, value in (
            ("dp_target_epsilon", self.target_epsilon),
            ("dp_noise_multiplier", self.noise_multiplier),
            ("dp_max_epsilon", self.max_epsilon),
        ):
            args[key] = value or 0
        return {k: repr(float(v)) for k, v in args.items()}


@dataclass(frozen=True)
class JobSettings:
    """FL knobs written into a job copy; ``None`` keeps the job's value."""

    rounds: int | None = None
    local_epochs: int | None = None
    min_clients: int | None = None
    site_timeout: int | None = None  # seconds the server waits for a site's answer to any task (see SITE_TIMEOUTS)
    quick: bool | None = None
    tracking: str | None = None  # one of TRACKING_MODES
    tracking_uri: str | None = None
    experiment_name: str | None = None
    wandb_project: str | None = None  # tracking "wandb": the W&B project (default: the MLflow experiment name)
    wandb_mode: str = "offline"  # tracking "wandb": one of WANDB_MODES (online needs WANDB_API_KEY at the server)
    resume_from: str | None = None  # an earlier job of the same server to go on from (see spleen_flare.resume)
    ship_code: bool = False  # development only: spleen_flare in the job's app/custom (bring-your-own-code)
    stats_min_count: int | None = None  # statistics job: the job's minimum count of cases (a site may set more)
    algorithm: str | None = None  # training jobs: an FL method of jobs/algorithms (None: the job's own, FedAvg)
    dp: DPOptions | None = None  # training jobs: DP-SGD at the sites (None: none)


def job_dir(name: str) -> Path:
    path = JOBS_DIR / name
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"unknown job {name!r}: expected one of {', '.join(JOB_NAMES)} under {JOBS_DIR}")
    return path


def place_bundle_and_code(
    job: Path, bundle_src: Path = BUNDLE_SRC, ship_code: bool = False, with_bundle: bool = True
) -> None:
    """Copy the bundle and its overrides into ``job/app/config`` (replacing older copies; not ``with_bundle``: the
    statistics job, which trains nothing); ``spleen_flare`` goes into ``job/app/custom`` only with ``ship_code``, and
    an older ``custom`` folder is removed otherwise."""
    if with_bundle and not (bundle_src / "configs").is_dir():
        raise FileNotFoundError(f"no bundle at {bundle_src}: expected {bundle_src}/configs/train.json")
    app = job / "app"
    targets = {bundle_src: app / "config" / BUNDLE_NAME, OVERRIDES_SRC: app / "config" / "overrides"}
    if not with_bundle:
        targets = {}
    if ship_code:
        targets[JOB_SIDE_SRC] = app / CUSTOM_DIR / JOB_SIDE_SRC.name
    elif (app / CUSTOM_DIR).exists():
        shutil.rmtree(app / CUSTOM_DIR)
    for src, dst in targets.items():
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=_BUNDLE_IGNORE)


def check_job_version(job: Path) -> None:
    """The job's meta.json names the installed job side's version (participants refuse a job that does not)."""
    named = json.loads((job / "meta.json").read_text()).get(JOB_VERSION_KEY)
    if named != __version__:
        raise ValueError(
            f"{job / 'meta.json'}: {JOB_VERSION_KEY} is {named!r}, the installed spleen_flare is {__version__}: "
            f"set it to {__version__!r}"
        )


def _set_script_args(args: str, updates: dict[str, str]) -> str:
    """Replace ``--key value`` pairs in a task_script_args string, appending keys it lacks."""
    tokens = shlex.split(args)
    for key, value in updates.items():
        flag = f"--{key}"
        if flag in tokens:
            tokens[tokens.index(flag) + 1] = value
        else:
            tokens += [flag, value]
    return shlex.join(tokens)


def get_script_args(job: Path) -> dict[str, str]:
    """The ``--key value`` pairs of the client's task_script_args."""
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    tokens = shlex.split(_client_executor_args(client)["task_script_args"])
    return {tokens[i][2:]: tokens[i + 1] for i in range(0, len(tokens) - 1, 2) if tokens[i].startswith("--")}


def _client_executor_args(client: dict) -> dict:
    for entry in client["executors"]:
        args = entry["executor"]["args"]
        if "task_script_args" in args:
            return args
    raise ValueError("config_fed_client.json has no executor with task_script_args")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def set_tracking(components: list[dict], settings: JobSettings) -> None:
    """Point the server's metrics receiver where ``settings`` says (see TRACKING_MODES)."""
    if settings.tracking is not None and settings.tracking not in TRACKING_MODES:
        raise ValueError(f"tracking must be one of {', '.join(TRACKING_MODES)}, got {settings.tracking!r}")
    index = next(i for i, c in enumerate(components) if c["id"] == MLFLOW_RECEIVER_ID)
    receiver = components[index]
    if settings.tracking == "tensorboard":
        components[index] = json.loads(json.dumps(TB_RECEIVER))
        return
    if settings.tracking == "wandb":
        components[index] = wandb_receiver(receiver["args"].get("kw_args", {}), settings)
        return
    if settings.tracking == "workspace":
        receiver["args"].pop("tracking_uri", None)
    elif settings.tracking_uri is not None:
        receiver["args"]["tracking_uri"] = settings.tracking_uri
    if settings.experiment_name is not None:
        receiver["args"].setdefault("kw_args", {})["experiment_name"] = settings.experiment_name
    if settings.resume_from:  # the resumed job's runs name the job whose runs hold the earlier rounds
        receiver["args"].setdefault("kw_args", {}).setdefault("run_tags", {})["resumed_from"] = settings.resume_from


def wandb_from_env(env: dict[str, str]) -> tuple[str | None, str]:
    """The W&B project and mode the one command uses: online only where W&B's own ``WANDB_API_KEY`` and
    ``WANDB_PROJECT`` are both set (the server inherits the key; the job carries only the project)."""
    project = env.get("WANDB_PROJECT") or None
    return project, "online" if project and env.get("WANDB_API_KEY") else "offline"


def wandb_receiver(mlflow_kw_args: dict, settings: JobSettings) -> dict:
    """The W&B receiver in place of the MLflow one: its project, run name and tags are the MLflow receiver's."""
    if settings.wandb_mode not in WANDB_MODES:
        raise ValueError(f"W&B mode must be one of {', '.join(WANDB_MODES)}, got {settings.wandb_mode!r}")
    project = settings.wandb_project or settings.experiment_name or mlflow_kw_args.get("experiment_name")
    tags = {**mlflow_kw_args.get("experiment_tags", {}), **mlflow_kw_args.get("run_tags", {})}
    if settings.resume_from:
        tags["resumed_from"] = settings.resume_from
    wandb_args = {
        "project": project,
        "name": mlflow_kw_args.get("run_name", "fedavg"),
        "group": project,
        "job_type": "train",
        "config": tags,
    }
    return {
        "id": "wandb_receiver",
        "path": WANDB_RECEIVER_PATH,
        "args": {"wandb_args": wandb_args, "mode": settings.wandb_mode, "events": ["fed.analytix_log_stats"]},
    }


# The server workflows' waits for sites: a site silent for longer is reported and the workflow goes on (or stops).
SITE_TIMEOUTS = {
    "scatter_and_gather": ("train_timeout",),
    "final_global_validation": ("timeout",),
    "cross_site_validate": ("submit_model_timeout", "validation_timeout"),
}


def set_site_timeout(workflows: list[dict], seconds: int) -> None:
    """Every wait of the server's workflows for a site (training, final validation, cross-site) to ``seconds``."""
    if seconds < 1:
        raise ValueError(f"site timeout must be at least 1 s, got {seconds}")
    for workflow in workflows:
        for arg in SITE_TIMEOUTS.get(workflow["id"], ()):
            workflow["args"][arg] = seconds


def _config_paths(job: Path) -> tuple[Path, Path, Path]:
    """A job folder's server config, client config and meta.json."""
    config_dir = job / "app" / "config"
    return config_dir / "config_fed_server.json", config_dir / "config_fed_client.json", job / "meta.json"


def apply_stats_settings(job: Path, settings: JobSettings) -> None:
    """The statistics job's knobs: the sites it needs and its minimum count (training knobs do not apply)."""
    paths = _config_paths(job)
    server, client, meta = (json.loads(p.read_text()) for p in paths)
    if settings.min_clients is not None:
        server["min_clients"] = meta["min_clients"] = settings.min_clients
    if settings.stats_min_count is not None:
        if settings.stats_min_count < 1:
            raise ValueError(f"the statistics' minimum count must be at least 1 case, got {settings.stats_min_count}")
        filters = [f for entry in client["task_result_filters"] for f in entry["filters"]]
        for f in filters:
            if f["path"] == STATS_PRIVACY_FILTER:
                f["args"]["min_count"] = settings.stats_min_count
    for path, data in zip(paths, (server, client, meta), strict=True):
        _write_json(path, data)


def apply_settings(job: Path, settings: JobSettings) -> None:
    """Write FL knobs into the job folder ``job`` (meant for a copy, see :func:`prepare_job`)."""
    if json.loads((job / "meta.json").read_text()).get("name") == STATS_JOB:
        apply_stats_settings(job, settings)
        return
    paths = _config_paths(job)
    server, client, meta = (json.loads(p.read_text()) for p in paths)

    updates: dict[str, str] = {}
    if settings.algorithm is not None:  # before the tracking: a W&B receiver copies the MLflow receiver's tags
        updates |= apply_algorithm(server, settings.algorithm, he=meta.get("name") == JOB_VARIANTS["he"])
    if settings.rounds is not None:
        server["num_rounds"] = settings.rounds
    if settings.min_clients is not None:
        server["min_clients"] = settings.min_clients
        meta["min_clients"] = settings.min_clients
    if settings.site_timeout is not None:
        set_site_timeout(server["workflows"], settings.site_timeout)
    set_tracking(server["components"], settings)
    if settings.resume_from is not None:
        if not JOB_ID_PATTERN.fullmatch(settings.resume_from):
            raise ValueError(f"resume from {settings.resume_from!r}: not a job id (see `nvflare job list`)")
        server["resume_from"] = settings.resume_from

    if settings.local_epochs is not None:
        updates["local_epochs"] = str(settings.local_epochs)
    if settings.quick is not None:
        updates["config_files"] = f"{TRAIN_CONFIG},{QUICK_OVERRIDE}" if settings.quick else TRAIN_CONFIG
    if settings.dp is not None:
        updates |= with_dp_configs(server, client, updates, settings.dp)
    if updates:
        executor_args = _client_executor_args(client)
        executor_args["task_script_args"] = _set_script_args(executor_args["task_script_args"], updates)

    for path, data in zip(paths, (server, client, meta), strict=True):
        _write_json(path, data)


def with_dp_configs(server: dict, client: dict, updates: dict[str, str], dp: DPOptions) -> dict[str, str]:
    """DP: the sites' options, and the bundle's DP override last in every participant's configs (the server builds
    the same network: instance norm instead of BatchNorm)."""
    problems = dp.problems()
    if problems:
        raise ValueError(problems[0])
    tokens = shlex.split(_client_executor_args(client)["task_script_args"])
    current = updates.get("config_files") or tokens[tokens.index("--config_files") + 1]
    for component in server["components"]:
        args = component.get("args", {})
        if isinstance(args.get("config_files"), str) and DP_OVERRIDE_FILE not in args["config_files"]:
            args["config_files"] = f"{args['config_files']},{DP_OVERRIDE_FILE}"
    configs = current if DP_OVERRIDE_FILE in current else f"{current},{DP_OVERRIDE_FILE}"
    return {"config_files": configs, **dp.script_args()}


def prepare_job(
    name: str,
    out_dir: Path | None = None,
    settings: JobSettings | None = None,
    bundle_src: Path = BUNDLE_SRC,
) -> Path:
    """Place bundle and code into ``jobs/<name>``; with ``out_dir``, also copy it there and apply ``settings``.

    Returns the folder to submit.
    """
    source = job_dir(name)
    check_job_version(source)
    ship_code = bool(settings and settings.ship_code)
    place_bundle_and_code(source, bundle_src, ship_code=ship_code, with_bundle=name != STATS_JOB)
    if out_dir is None:
        if settings and settings != JobSettings(ship_code=ship_code):
            raise ValueError("rounds/epochs/sites/quick/tracking settings are written into a copy: add --out DIR")
        return source
    target = Path(out_dir) / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=_BUNDLE_IGNORE)
    if settings:
        apply_settings(target, settings)
    return target
