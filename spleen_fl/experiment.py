"""One command for the real federated system: data, jobs, POC (or a secure system), MLflow, submit, follow, results.

``run_experiment(settings)`` does, in order: make a run directory ``runs/<timestamp>/`` (and ``runs/latest``);
make or reuse the synthetic dataset (or use ``--data``) and write per-site datalists into the run directory;
prepare a configured job copy; start an MLflow server (SQLite store in the run directory) and the FL system;
submit the job; follow the sites' ``[spleen]`` progress lines; download the job; write ``summary.json``; print
the cross-site table; stop everything it started (also on error, Ctrl-C, SIGTERM and ``--timeout``).
Every PID/process group it starts is recorded in ``<run dir>/pids.json`` (``stop_run`` uses it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spleen_fl.jobs import JOBS_DIR, REPO_ROOT, JobSettings, prepare_job

JOB_VARIANTS = {"local": "spleen_ct_segmentation_local", "he": "spleen_ct_segmentation_he"}
GLOBAL_MODEL = "SRV_FL_global_model.pt"
DEFAULT_RUNS_DIR = REPO_ROOT / "runs"
DATA_DIR_ENV = "SPLEEN_DATA_DIR"
DATALIST_ENV = "SPLEEN_DATALIST"
TERMINAL_OK = ("FINISHED:COMPLETED", "FINISHED_OK")


class ExperimentError(RuntimeError):
    """A failure with a message meant for the user (printed as one line)."""


class SettingsError(ExperimentError):
    """Bad options or a missing job/module: the command line is at fault (exit status 2)."""


class RunTimeout(ExperimentError):
    pass


class Terminated(BaseException):
    """SIGTERM turned into an exception so that cleanup runs (BaseException, like KeyboardInterrupt)."""


@dataclass(frozen=True)
class ExperimentSettings:
    job: str = "local"  # "local" or "he"
    sites: int = 2
    rounds: int = 3
    local_epochs: int = 2
    quick: bool = True
    data: Path | None = None  # a real MSD Task09_Spleen folder; None = synthetic data
    synthetic_cases: int = 16
    synthetic_shape: tuple[int, int, int] = (96, 96, 24)
    synthetic_seed: int = 0
    runs_dir: Path = DEFAULT_RUNS_DIR
    keep_running: bool = False
    secure: bool = False
    timeout: float = 1800.0
    mlflow_port: int | None = None
    poll_interval: float = 2.0

    @property
    def job_name(self) -> str:
        return JOB_VARIANTS[self.job]

    def validate(self) -> None:
        if self.job not in JOB_VARIANTS:
            raise SettingsError(f"--job must be one of {', '.join(JOB_VARIANTS)}, got {self.job!r}")
        for name, value, low in (("--sites", self.sites, 1), ("--rounds", self.rounds, 1)):
            if value < low:
                raise SettingsError(f"{name} must be at least {low}, got {value}")
        if self.local_epochs < 1:
            raise SettingsError(f"--local-epochs must be at least 1, got {self.local_epochs}")
        if self.timeout <= 0:
            raise SettingsError(f"--timeout must be positive, got {self.timeout}")
        if self.data is not None and not (Path(self.data) / "dataset.json").is_file():
            raise SettingsError(f"--data {self.data}: no dataset.json there (expected an MSD Task09_Spleen folder)")
        if self.data is None and self.synthetic_cases < 2 * self.sites:
            raise SettingsError(
                f"--synthetic-cases {self.synthetic_cases} is too few for {self.sites} sites "
                f"(need at least {2 * self.sites}: one training and one validation case per site)"
            )
        if not (JOBS_DIR / self.job_name / "meta.json").is_file():
            raise SettingsError(
                f"job {self.job_name} not found under {JOBS_DIR} (--job {self.job} needs it; the HE job comes with "
                "the HE work)"
            )


# -- progress lines --------------------------------------------------------------------------------------------
_KV = re.compile(r"(\w+)=(\S+)")
_TAG = re.compile(r"\[(spleen(?:-he)?)\]\s+(.*)")
# NVFlare's ScatterAndGather on the server: "<asctime> - ... - Round 3 started." / "... Round 3 finished."
_FL_ROUND = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*\bRound (\d+) (started|finished)\.\s*$")


def _number(text: str) -> float | int | str:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse_progress_line(line: str) -> dict | None:
    """``[spleen] site=.. round=.. global_dice=.. ...`` or ``[spleen-he] side=.. stage=..`` -> dict, else None.

    Tolerant: extra words, log prefixes and unknown keys are fine; a line without ``site``/``side`` is ignored.
    The result has ``kind``: "round", "cross_site", "he", "info", or "fl_round" (the server's round start or end,
    with the log line's time as ``at``, seconds since the epoch).
    """
    match = _TAG.search(line)
    if not match:
        fl_round = _FL_ROUND.match(line)
        if not fl_round:
            return None
        stamp, rnd, stage = fl_round.groups()
        at = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return {"kind": "fl_round", "side": "server", "round": int(rnd), "stage": stage, "at": at}
    tag, rest = match.groups()
    fields: dict = {key: _number(value) for key, value in _KV.findall(rest)}
    if tag == "spleen-he":
        if "side" not in fields or "stage" not in fields:
            return None
        fields["kind"] = "he"
        return fields
    if "site" not in fields:
        return None
    if re.search(r"\bcross_site\b", rest):
        fields["kind"] = "cross_site"
    elif "round" in fields and isinstance(fields["round"], int):
        fields["kind"] = "round"
    else:
        fields["kind"] = "info"
    return fields


class LogFollower:
    """Reads new lines from log files under some folders (``log.txt`` and ``<job_id>/log.txt``)."""

    def __init__(self, roots: Iterable[Path], patterns: tuple[str, ...] = ("log.txt", "*/log.txt")) -> None:
        self.roots = [Path(r) for r in roots]
        self.patterns = patterns
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, str] = {}

    def files(self) -> list[Path]:
        found = []
        for root in self.roots:
            for pattern in self.patterns:
                found.extend(p for p in root.glob(pattern) if p.is_file())
        return sorted(set(found))

    def skip_existing(self) -> None:
        """Start after what the files hold now (lines from earlier jobs are not ours)."""
        for path in self.files():
            self._offsets[path] = path.stat().st_size

    def poll(self) -> list[str]:
        lines: list[str] = []
        for path in self.files():
            offset = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                continue
            if not chunk:
                continue
            self._offsets[path] = offset + len(chunk)
            text = self._partial.pop(path, "") + chunk.decode(errors="replace")
            *complete, last = text.split("\n")
            if last:
                self._partial[path] = last
            lines.extend(complete)
        return lines


# -- what the run has seen --------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Collects progress events; knows when a round is complete (all sites reported it)."""

    sites: list[str]
    rounds: int
    start: float = field(default_factory=time.monotonic)
    per_round: dict[int, dict[str, dict]] = field(default_factory=dict)
    round_done_at: dict[int, float] = field(default_factory=dict)
    cross_site_local: dict[str, float] = field(default_factory=dict)
    he_events: list[dict] = field(default_factory=list)
    fl_round_marks: dict[int, dict[str, float]] = field(default_factory=dict)
    _seen: set = field(default_factory=set)

    def add(self, event: dict, now: float | None = None) -> list[str]:
        """Record one parsed event; return the lines to print about it (maybe none)."""
        now = time.monotonic() if now is None else now
        kind = event["kind"]
        key = (
            kind,
            event.get("site") or event.get("side"),
            event.get("round"),
            event.get("stage"),
            event.get("val_mean_dice") if kind == "cross_site" else None,
        )
        if key in self._seen:  # the same line can show up in the site log and the job log
            return []
        self._seen.add(key)
        if kind == "he":
            self.he_events.append(event)
            return []
        if kind == "fl_round":
            self.fl_round_marks.setdefault(event["round"], {})[event["stage"]] = float(event["at"])
            return []
        if kind == "cross_site":
            dice = event.get("val_mean_dice")
            if isinstance(dice, float | int):
                self.cross_site_local[event["site"]] = float(dice)
            return [f"{self._clock(now)} cross-site validation: {event['site']} scored a model, Dice {_fmt(dice)}"]
        if kind != "round":
            return []
        rnd, site = event["round"], event["site"]
        self.per_round.setdefault(rnd, {})[site] = event
        out = [
            f"{self._clock(now)} round {rnd + 1}/{self.rounds} {site}: loss {_fmt(event.get('loss'))}, "
            f"local Dice {_fmt(event.get('local_dice'))} (global model before training: "
            f"{_fmt(event.get('global_dice'))})"
        ]
        if set(self.per_round[rnd]) >= set(self.sites) and rnd not in self.round_done_at:
            self.round_done_at[rnd] = now
            times = self.round_times()
            left = self.estimate_left(now)
            out.append(
                f"{self._clock(now)} round {rnd + 1}/{self.rounds} done in {times[-1]:.0f} s; "
                f"elapsed {_mmss(now - self.start)}, about {_mmss(left)} left"
            )
        return out

    def round_times(self) -> list[float]:
        times, prev = [], self.start
        for rnd in sorted(self.round_done_at):
            times.append(round(self.round_done_at[rnd] - prev, 1))
            prev = self.round_done_at[rnd]
        return times

    def fl_round_times(self) -> list[float]:
        """The server's round durations (round started -> finished, from its log's timestamps), in round order."""
        times = []
        for rnd in sorted(self.fl_round_marks):
            marks = self.fl_round_marks[rnd]
            if "started" in marks and "finished" in marks:
                times.append(round(marks["finished"] - marks["started"], 1))
        return times

    def site_work_times(self) -> list[float | None]:
        """Per round, the slowest site's own work (global-model validation + local training), from ``work_s``."""
        out = []
        for rnd in sorted(self.per_round):
            works = [e["work_s"] for e in self.per_round[rnd].values() if isinstance(e.get("work_s"), float | int)]
            out.append(round(max(works), 1) if works else None)
        return out

    def estimate_left(self, now: float) -> float:
        """Mean round time x rounds left, plus about half a round for cross-site validation."""
        times = self.round_times()
        if not times:
            return math.nan
        mean = sum(times) / len(times)
        return max(0.0, mean * (self.rounds - len(times)) + 0.5 * mean)

    def untrained_dice(self) -> dict[str, float]:
        return {s: float(e["global_dice"]) for s, e in self.per_round.get(0, {}).items() if "global_dice" in e}

    def _clock(self, now: float) -> str:
        return f"[{_mmss(now - self.start)}]"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float | int) else "?"


def _mmss(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?:??"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# -- results ----------------------------------------------------------------------------------------------------
def cross_site_by_model(results: dict) -> dict[str, dict[str, float]]:
    """``{site: {model: {"val_mean_dice": x}}}`` (cross_val_results.json) -> ``{model: {site: x}}``."""
    table: dict[str, dict[str, float]] = {}
    for site, models in sorted(results.items()):
        for model, metrics in (models or {}).items():
            dice = metrics.get("val_mean_dice") if isinstance(metrics, dict) else None
            if isinstance(dice, float | int):
                table.setdefault(model, {})[site] = float(dice)
    return table


def format_cross_site_table(cross_site: dict[str, dict[str, float]], sites: list[str]) -> str:
    """Rows: models, columns: sites, Dice with 4 decimals (``-`` where missing)."""
    models = sorted(cross_site, key=lambda m: (not m.startswith("SRV_"), m))
    width = max([len("model"), *map(len, models)])
    header = "model".ljust(width) + "".join(f"  {s:>8}" for s in sites)
    lines = [header, "-" * len(header)]
    for model in models:
        cells = "".join(f"  {cross_site[model][s]:8.4f}" if s in cross_site[model] else f"  {'-':>8}" for s in sites)
        lines.append(model.ljust(width) + cells)
    return "\n".join(lines)


def he_summary(events: list[dict], param_count: int | None = None) -> dict:
    """HE costs from ``[spleen-he]`` events: per-round seconds per stage and one client update's size.

    ``<stage>_s[r]`` is round r's time (the slowest participant), ``None`` where round r had no such step (no
    decryption in round 0: the initial global model is plaintext). Only training rounds count (``task=train``,
    or no task, and an integer ``round``): cross-site evaluation's encrypt/decrypt lines are left out.
    """
    train = [e for e in events if e.get("task", "train") == "train" and isinstance(e.get("round"), int)]
    if not train:
        return {}
    out: dict = {}
    last_round = max(e["round"] for e in train)
    for stage in ("encrypt", "aggregate", "decrypt"):
        per_round: dict[int, float] = {}
        for e in train:
            if e.get("stage") == stage and isinstance(e.get("seconds"), float | int):
                per_round[e["round"]] = max(per_round.get(e["round"], 0.0), float(e["seconds"]))
        out[f"{stage}_s"] = [per_round.get(r) for r in range(last_round + 1)]
    client_enc = [
        e
        for e in train
        if e.get("stage") == "encrypt" and e.get("side") != "server" and isinstance(e.get("bytes"), int)
    ]
    if client_enc:
        first = min(client_enc, key=lambda e: (e["round"], str(e.get("side"))))
        out["update_bytes_encrypted"] = first["bytes"]
        plain = first.get("plain_bytes")
        if not isinstance(plain, int) and param_count:
            plain = 4 * param_count  # float32 weights
        out["update_bytes_plain"] = plain
        if isinstance(plain, int) and plain > 0:
            out["update_bytes_ratio"] = round(first["bytes"] / plain, 2)
    return out


def build_summary(
    *,
    settings: ExperimentSettings,
    job_id: str | None,
    status: str | None,
    sites: list[str],
    wall_time_s: float,
    progress: Progress,
    cross_site_results: dict | None,
    mlflow_info: dict,
    paths: dict[str, str],
    param_count: int | None = None,
) -> dict:
    cross_site = cross_site_by_model(cross_site_results or {})
    summary = {
        "job_id": job_id,
        "job_name": settings.job_name,
        "status": status,
        "sites": sites,
        "rounds": settings.rounds,
        "local_epochs": settings.local_epochs,
        "quick": settings.quick,
        "data": str(settings.data) if settings.data else "synthetic",
        "wall_time_s": round(wall_time_s, 1),
        "round_times_s": progress.round_times(),
        "fl_round_s": progress.fl_round_times(),
        "site_work_s": progress.site_work_times(),
        "untrained_dice": progress.untrained_dice(),
        "global_dice_per_round": {
            str(r): {s: e.get("global_dice") for s, e in sorted(progress.per_round[r].items())}
            for r in sorted(progress.per_round)
        },
        "final_global_dice": cross_site.get(GLOBAL_MODEL, {}),
        "cross_site": cross_site,
        "mlflow": mlflow_info,
        "paths": paths,
    }
    summary.update(he_summary(progress.he_events, param_count))
    return summary


# -- the run ----------------------------------------------------------------------------------------------------
def make_run_dir(runs_dir: Path) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        path = runs_dir / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        latest = runs_dir / "latest"
        tmp = runs_dir / f".latest-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(path.name)
        tmp.replace(latest)  # atomic: runs/latest always points at a whole run directory
        return path
    raise ExperimentError(f"could not make a run directory under {runs_dir}")


def prepare_data(settings: ExperimentSettings, run_dir: Path, log: Callable[[str], None]) -> tuple[Path, Path]:
    """Dataset folder and the folder of per-site datalists (always inside the run directory)."""
    from spleen_fl.data import make_site_datalists, make_synthetic_dataset

    if settings.data is not None:
        dataset = Path(settings.data).resolve()
        log(f"data: {dataset}")
    else:
        shape = settings.synthetic_shape
        key = f"synthetic-n{settings.synthetic_cases}-{'x'.join(map(str, shape))}-seed{settings.synthetic_seed}"
        cache = Path(settings.runs_dir).resolve() / "cache" / key  # absolute: the clients run elsewhere
        dataset = cache / "Task09_Spleen"
        meta = dataset / "dataset.json"
        if meta.is_file() and len(json.loads(meta.read_text()).get("training", [])) == settings.synthetic_cases:
            log(f"data: synthetic, reused from {dataset}")
        else:
            log(f"data: making {settings.synthetic_cases} synthetic cases ({'x'.join(map(str, shape))}) in {dataset}")
            dataset = make_synthetic_dataset(
                cache, num_train=settings.synthetic_cases, num_test=1, shape=shape, seed=settings.synthetic_seed
            )
    datalists = run_dir / "datalists"
    try:
        make_site_datalists(dataset, settings.sites, out_dir=datalists)
    except ValueError as err:
        raise ExperimentError(str(err)) from err
    return dataset, datalists


def _find_status(data) -> str | None:
    if isinstance(data, dict):
        for key in ("status", "job_status"):
            if isinstance(data.get(key), str):
                return data[key]
        for value in data.values():
            found = _find_status(value)
            if found:
                return found
    return None


class Nvflare:
    """``nvflare --format json <args> --startup-kit KIT`` with the FL system's environment; JSON ``data`` back."""

    def __init__(self, startup_kit: Path, env: dict[str, str], log_path: Path) -> None:
        self.startup_kit = startup_kit
        self.env = env
        self.log_path = log_path
        self.bin = str(Path(sys.executable).parent / "nvflare")

    def __call__(self, *args: str, timeout: float = 120.0) -> dict:
        cmd = [self.bin, "--format", "json", *args, "--startup-kit", str(self.startup_kit)]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        with open(self.log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        try:
            reply = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        except ValueError:
            reply = {}
        if proc.returncode != 0 or reply.get("status") not in (None, "ok"):
            message = reply.get("message") or reply.get("error") or proc.stderr.strip()[-300:]
            raise ExperimentError(f"`nvflare {' '.join(args)}` failed: {message} (see {self.log_path})")
        return reply.get("data") or {}


def mlflow_runs(url: str, experiment_name: str, job_id: str | None, sites: list[str]) -> dict:
    import mlflow

    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {"tracking_uri": url, "experiment_name": experiment_name, "experiment_id": None, "run_ids": {}}
    run_ids = {}
    for run in client.search_runs([experiment.experiment_id]):
        if job_id and run.data.tags.get("job_id") not in (None, job_id):
            continue
        match = re.search(r"(site-\d+)", run.info.run_name or "")
        if match and match.group(1) in sites:
            run_ids[match.group(1)] = run.info.run_id
    return {
        "tracking_uri": url,
        "experiment_name": experiment_name,
        "experiment_id": experiment.experiment_id,
        "run_ids": run_ids,
    }


def _update_pids(pid_file: Path, **entries) -> None:
    data = json.loads(pid_file.read_text()) if pid_file.is_file() else {}
    data.update(entries)
    pid_file.write_text(json.dumps(data, indent=2) + "\n")


def all_pids(pid_file: Path) -> list[int]:
    """Every PID/process group recorded for a run (the runner itself excluded)."""
    data = json.loads(Path(pid_file).read_text())
    pids = []
    for key, value in data.items():
        if key == "runner":
            continue
        if isinstance(value, int):
            pids.append(value)
        elif isinstance(value, dict):
            pids.extend(v for v in value.values() if isinstance(v, int))
    return pids


def _install_sigterm() -> Callable[[], None]:
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _make_system(settings: ExperimentSettings, run_dir: Path, env: dict[str, str], pid_file: Path):
    if settings.secure:
        from spleen_fl.secure import SecureSystem

        # The provisioned kits already hold the TLS certificates and the CKKS context (HE needs no extra flag).
        return SecureSystem(n_sites=settings.sites, env=env, pid_file=pid_file)
    from spleen_fl.poc import PocSystem

    return PocSystem(run_dir / "poc", settings.sites, he=settings.job == "he", env=env, pid_file=pid_file)


def _preflight(settings: ExperimentSettings) -> None:
    """Fail fast, before data and MLflow, when the FL system cannot start."""
    if settings.secure:
        from spleen_fl.secure import NotProvisionedError, SecureError, preflight

        try:
            preflight(settings.sites)
        except NotProvisionedError as err:
            raise SettingsError(str(err)) from None
        except SecureError as err:
            raise ExperimentError(str(err)) from None
    else:
        from spleen_fl.poc import preflight

        preflight()


def run_experiment(settings: ExperimentSettings, out: Callable[[str], None] = print) -> int:
    """The whole run; returns 0 on success. Raises ExperimentError (user-facing), RunTimeout, KeyboardInterrupt."""
    from spleen_fl.mlflow_server import MLflowServer

    settings.validate()
    t0 = time.monotonic()
    deadline = t0 + settings.timeout
    run_dir = make_run_dir(Path(settings.runs_dir).resolve())
    pid_file = run_dir / "pids.json"
    _update_pids(pid_file, runner=os.getpid())
    (run_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2, default=str) + "\n")
    out(f"run directory: {run_dir}")
    restore_sigterm = _install_sigterm()
    mlflow_server = system = None
    keep = False
    try:
        _preflight(settings)
        dataset, datalists = prepare_data(settings, run_dir, out)
        env = {DATA_DIR_ENV: str(dataset), DATALIST_ENV: str(datalists / "{site}.json")}

        mlflow_server = MLflowServer(run_dir / "mlflow", port=settings.mlflow_port)
        mlflow_server.start()
        _update_pids(pid_file, mlflow=mlflow_server.process.pid)
        out(f"MLflow: {mlflow_server.url} (store {run_dir / 'mlflow'}, log {mlflow_server.log_path})")

        experiment_name = settings.job_name
        job_settings = JobSettings(
            rounds=settings.rounds,
            local_epochs=settings.local_epochs,
            min_clients=settings.sites,
            quick=settings.quick,
            tracking_uri=mlflow_server.url,
            experiment_name=experiment_name,
        )
        job_folder = prepare_job(settings.job_name, run_dir / "jobs", job_settings)
        out(
            f"job: {job_folder} ({settings.rounds} rounds x {settings.local_epochs} local epochs, "
            f"quick={settings.quick})"
        )

        system = _make_system(settings, run_dir, env, pid_file)
        out(f"starting the FL system ({'secure' if settings.secure else 'POC'}, {settings.sites} sites) ...")
        system.start()
        if time.monotonic() > deadline:
            raise RunTimeout(f"timed out after {settings.timeout:.0f} s while starting the FL system")
        site_names = list(system.site_names)
        log_roots = {name: (p.parent if p.suffix else p) for name, p in system.log_paths.items()}
        for name, root in log_roots.items():
            out(f"  {name} logs: {root}/log.txt and {root}/<job_id>/log.txt")

        follower = LogFollower(log_roots.values())
        follower.skip_existing()
        nv_env = system.env() if hasattr(system, "env") else dict(os.environ)
        nvflare = Nvflare(Path(system.admin_startup_kit), nv_env, run_dir / "logs" / "nvflare_cli.log")
        (run_dir / "logs").mkdir(exist_ok=True)
        job_id = nvflare("job", "submit", "-j", str(job_folder))["job_id"]
        _update_pids(pid_file, job_id=job_id)
        out(f"submitted {settings.job_name}: job_id {job_id}")

        progress = Progress(site_names, settings.rounds)
        status, next_status = None, 0.0
        while True:
            for line in follower.poll():
                event = parse_progress_line(line)
                if event:
                    for msg in progress.add(event):
                        out(msg)
            now = time.monotonic()
            if now > deadline:
                with contextlib.suppress(Exception):
                    nvflare("job", "abort", job_id, "--force", timeout=60)
                raise RunTimeout(f"timed out after {settings.timeout:.0f} s (job {job_id} aborted)")
            if now >= next_status:
                status = _find_status(nvflare("job", "meta", job_id))
                next_status = now + 10.0
                if status and (status.startswith("FINISHED") or status in ("ABORTED", "FAILED")):
                    for line in follower.poll():  # the last lines
                        event = parse_progress_line(line)
                        if event:
                            for msg in progress.add(event):
                                out(msg)
                    break
            time.sleep(settings.poll_interval)
        out(f"job {job_id} finished: {status}")

        download_dir = run_dir / "job_result"
        nvflare("job", "download", job_id, "-o", str(download_dir), "--force", timeout=300)
        found = sorted(download_dir.rglob("cross_val_results.json"))
        cross_site_results = json.loads(found[0].read_text()) if found else None
        if found:
            (run_dir / "cross_val_results.json").write_text(found[0].read_text())
        info = mlflow_runs(mlflow_server.url, experiment_name, job_id, site_names)
        paths = {
            "run_dir": str(run_dir),
            "job_result": str(download_dir),
            "cross_val_results": str(found[0]) if found else None,
            "mlflow_store": str(run_dir / "mlflow"),
            "logs": str(run_dir / "logs"),
            **{f"log_{n}": str(p) for n, p in log_roots.items()},
        }
        param_count = _param_count(download_dir) if progress.he_events else None
        summary = build_summary(
            settings=settings,
            job_id=job_id,
            status=status,
            sites=site_names,
            wall_time_s=time.monotonic() - t0,
            progress=progress,
            cross_site_results=cross_site_results,
            mlflow_info=info,
            paths=paths,
            param_count=param_count,
        )
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _report(summary, site_names, out)
        problems = []
        if status not in TERMINAL_OK:
            problems.append(f"job ended {status}")
        if not cross_site_results:
            problems.append("no cross-site results in the downloaded job")
        elif (
            any(set(site_names) - set(v) for v in summary["cross_site"].values())
            or GLOBAL_MODEL not in summary["cross_site"]
        ):
            problems.append("the cross-site table is incomplete")
        if problems:
            raise ExperimentError(
                "; ".join(problems) + f" (logs: {run_dir / 'logs'}, {', '.join(map(str, log_roots.values()))})"
            )
        keep = settings.keep_running
        if keep:
            out("")
            out(
                f"still running (--keep-running): {'the secure system' if settings.secure else 'POC'} and MLflow "
                "stay up. Stop them with:"
            )
            out(f"  ./run_experiment.sh --stop {run_dir}")
            if not settings.secure:
                out(
                    f"  (or by hand: HOME={run_dir}/nvflare_home NVFLARE_POC_WORKSPACE={run_dir}/poc "
                    f".venv/bin/nvflare poc stop; kill -TERM -- -{mlflow_server.process.pid})"
                )
        return 0
    finally:
        restore_sigterm()
        if not keep:
            # Ignore further SIGINT/SIGTERM while we stop things: a second Ctrl-C must not leave orphans.
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                if system is not None:
                    system.stop()
                if mlflow_server is not None:
                    mlflow_server.stop()
            finally:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, old_term)
            left = [p for p in all_pids(pid_file) if _alive(p)]
            if left:
                out(f"warning: processes still alive after stopping: {left}")


def _param_count(download_dir: Path) -> int | None:
    """Number of weights in the downloaded global model (for the plain update size of HE runs)."""
    found = sorted(download_dir.rglob("FL_global_model.pt"))
    if not found:
        return None
    try:
        import torch

        state = torch.load(found[0], map_location="cpu", weights_only=False)
        state = state.get("model", state) if isinstance(state, dict) else state
        return int(sum(v.numel() for v in state.values() if hasattr(v, "numel")))
    except Exception:
        return None


def _alive(pid: int) -> bool:
    from spleen_fl.poc import pid_alive

    return pid_alive(pid)


def _report(summary: dict, sites: list[str], out: Callable[[str], None]) -> None:
    out("")
    out("cross-site validation (Dice, rows: models, columns: sites):")
    out(format_cross_site_table(summary["cross_site"], sites))
    untrained, final = summary["untrained_dice"], summary["final_global_dice"]
    if untrained or final:
        out("")
        out("global model Dice on each site's validation data:")
        for site in sites:
            out(
                f"  {site}: untrained {_fmt(untrained.get(site))} -> "
                f"after {summary['rounds']} rounds {_fmt(final.get(site))}"
            )
    out("")
    out(f"wall time {_mmss(summary['wall_time_s'])}; round times (s): {summary['round_times_s']}")
    if summary.get("fl_round_s"):
        out(
            f"server round times (s): {summary['fl_round_s']}; slowest site's own work per round (validation + "
            f"training, s): {summary.get('site_work_s')}"
        )
    if summary.get("update_bytes_encrypted"):
        plain = summary.get("update_bytes_plain")
        ratio = f" = {summary['update_bytes_ratio']}x the plaintext {plain / 1e6:.1f} MB" if plain else ""
        out(
            f"HE: one client update {summary['update_bytes_encrypted'] / 1e6:.1f} MB{ratio}; per round (s): "
            f"encrypt {summary.get('encrypt_s')}, aggregate {summary.get('aggregate_s')}, "
            f"decrypt {summary.get('decrypt_s')}"
        )
    m = summary["mlflow"]
    out(f"MLflow: {m['tracking_uri']} experiment {m['experiment_name']!r} (id {m['experiment_id']})")
    if m.get("experiment_id") is not None:
        out(f"  {m['tracking_uri']}/#/experiments/{m['experiment_id']}")
    out(f"summary: {summary['paths']['run_dir']}/summary.json")


def stop_run(run_dir: Path, out: Callable[[str], None] = print) -> int:
    """Stop what a ``--keep-running`` run left up, from its ``pids.json``; 0 when nothing is left."""
    from spleen_fl.poc import pid_alive, stop_pids

    run_dir = Path(run_dir).resolve()
    pid_file = run_dir / "pids.json"
    if not pid_file.is_file():
        raise SettingsError(f"{run_dir} has no pids.json: not a run directory")
    data = json.loads(pid_file.read_text())
    poc = data.get("poc") or {}
    if poc.get("workspace") and any(pid_alive(v) for k, v in poc.items() if isinstance(v, int) and k != "poc_group"):
        env = dict(os.environ, HOME=poc["home"], NVFLARE_POC_WORKSPACE=poc["workspace"])
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                [str(Path(sys.executable).parent / "nvflare"), "poc", "stop"],
                env=env,
                capture_output=True,
                timeout=90,
                check=False,
            )
    groups = {k: v for k, v in poc.items() if isinstance(v, int)}
    left = stop_pids(groups)
    if (data.get("secure") or {}).get("workspace"):
        from spleen_fl.secure import stop_system

        left += stop_system(Path(data["secure"]["workspace"]))
    if isinstance(data.get("mlflow"), int):
        left += stop_pids({"poc_group": data["mlflow"], "mlflow": data["mlflow"]})
    if left:
        out(f"still alive: {left}")
        return 1
    out(f"stopped everything recorded in {pid_file}")
    return 0
