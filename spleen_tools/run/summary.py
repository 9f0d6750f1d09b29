"""``summary.json``: what a finished run measured, from its progress events, the downloaded job and the run's later
steps (tracking, plots, the model bundle, the secrets scan), as one typed record: ``RunSummary``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from itertools import takewhile
from pathlib import Path

from spleen_tools.flare import TERMINAL_OK
from spleen_tools.job_result import GLOBAL_MODEL, cross_site_by_model, model_choice
from spleen_tools.run.progress import Progress
from spleen_tools.run.settings import ExperimentSettings

SUMMARY_FILE = "summary.json"
HE_STAGES = ("encrypt", "aggregate", "decrypt")


@dataclass(frozen=True)
class HeCosts:
    """An HE job's costs: per-round seconds per stage (``None`` where a round had no such step) and one client
    update's size; summary.json holds them as top-level keys (``encrypt_s``, ``update_bytes_encrypted``, ...)."""

    encrypt_s: list[float | None] = field(default_factory=list)
    aggregate_s: list[float | None] = field(default_factory=list)
    decrypt_s: list[float | None] = field(default_factory=list)
    update_bytes_encrypted: int | None = None  # None: no site's encrypt line named a size (then no sizes at all)
    update_bytes_plain: int | None = None
    update_bytes_ratio: float | None = None

    def to_json(self) -> dict:
        out: dict = {f"{stage}_s": getattr(self, f"{stage}_s") for stage in HE_STAGES}
        if self.update_bytes_encrypted is not None:
            out["update_bytes_encrypted"] = self.update_bytes_encrypted
            out["update_bytes_plain"] = self.update_bytes_plain  # null when neither the line nor the model said it
            if self.update_bytes_ratio is not None:
                out["update_bytes_ratio"] = self.update_bytes_ratio
        return out

    @classmethod
    def from_json(cls, data: dict) -> HeCosts | None:
        if "encrypt_s" not in data:  # not an HE job
            return None
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class Tracking:
    """Where the sites' metrics went, per ``--tracking``: summary.json's ``mlflow`` (always there, null without a
    store), and ``tensorboard`` or ``wandb`` only in those modes."""

    mlflow: dict | None = None
    tensorboard: dict | None = None
    wandb: dict | None = None


@dataclass(frozen=True)
class RunSummary:
    """One run's summary.json, built from the steps' results (``dataclasses.replace`` adds a later step's); fields
    in the file's key order, but ``tracking`` and ``he`` each stand for several keys. Optional keys (``None`` here)
    stay out of the file: the best/final model without a model history, ``status_note`` unless the run needed one,
    ``model_bundle`` and ``secrets_scan`` before those steps ran."""

    job_id: str | None = None
    job_name: str = ""
    status: str | None = None
    sites: list[str] = field(default_factory=list)
    rounds: int = 0
    local_epochs: int = 0
    quick: bool = False
    data: str = "synthetic"
    wall_time_s: float = 0.0
    round_times_s: list[float] = field(default_factory=list)
    fl_round_s: list[float] = field(default_factory=list)
    site_work_s: list[float] = field(default_factory=list)
    untrained_dice: dict[str, float] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)  # what each site trained on
    gpu_peak_mb: dict[str, float] = field(default_factory=dict)  # per site; empty when no site used a GPU
    data_errors: list[str] = field(default_factory=list)
    job_errors: list[str] = field(default_factory=list)  # the server's own (no resume), a policy's refusal
    dropped: list[dict] = field(default_factory=list)  # rounds the server closed without a site's result
    global_dice_per_round: dict[str, dict[str, float | None]] = field(default_factory=dict)
    final_global_dice: dict[str, float] = field(default_factory=dict)
    final_model: dict | None = None  # {round, sha256}
    best_model: dict | None = None  # {round, sha256, KEY_METRIC}
    cross_site: dict[str, dict[str, float]] = field(default_factory=dict)  # {model: {site: Dice}}
    tracking: Tracking | None = None  # None: the summary says nothing of tracking (no ``mlflow`` key)
    paths: dict[str, str | None] = field(default_factory=dict)
    he: HeCosts | None = None
    dp: dict | None = None  # DP-SGD: delta, each site's noise multiplier and epsilon after each round
    server_peak_memory_mb: float | None = None
    resumed: list[dict] = field(default_factory=list)  # jobs lost with a restarted server, and their successors
    status_note: str | None = None  # why a job that dropped a site did not end OK, where NVFlare's cause is known
    plots: dict[str, str] = field(default_factory=dict)
    model_bundle: dict | None = None
    secrets_scan: dict | None = None

    @property
    def needs_status_note(self) -> bool:
        """A job that dropped a site and did not end OK: the run looks for why (``status_note``, null if unknown)."""
        return bool(self.dropped) and self.status not in TERMINAL_OK

    def to_json(self) -> dict:
        """summary.json's keys and values, in the file's order; an optional key only where it is set."""
        out = {name: getattr(self, name) for name in PLAIN_HEAD}
        _put(out, final_model=self.final_model, best_model=self.best_model)
        out["cross_site"] = self.cross_site
        if self.tracking is not None:
            out["mlflow"] = self.tracking.mlflow
        out["paths"] = self.paths
        out.update(self.he.to_json() if self.he else {})
        _put(out, dp=self.dp)
        out["server_peak_memory_mb"] = self.server_peak_memory_mb
        out["resumed"] = self.resumed
        if self.tracking is not None:
            _put(out, tensorboard=self.tracking.tensorboard, wandb=self.tracking.wandb)
        if self.status_note is not None or self.needs_status_note:
            out["status_note"] = self.status_note
        out["plots"] = self.plots
        _put(out, model_bundle=self.model_bundle, secrets_scan=self.secrets_scan)
        return out

    @classmethod
    def from_json(cls, data: dict) -> RunSummary:
        """The record of a written summary.json; keys an older file lacks take their defaults."""
        plain = {f.name for f in fields(cls)} - {"tracking", "he"}
        tracked = any(key in data for key in ("mlflow", "tensorboard", "wandb"))
        tracking = Tracking(data.get("mlflow"), data.get("tensorboard"), data.get("wandb")) if tracked else None
        return cls(**{k: v for k, v in data.items() if k in plain}, tracking=tracking, he=HeCosts.from_json(data))

    @classmethod
    def load(cls, path: Path | str) -> RunSummary:
        """A run directory's summary.json (or the file itself)."""
        path = Path(path)
        return cls.from_json(json.loads((path / SUMMARY_FILE if path.is_dir() else path).read_text()))

    def save(self, run_dir: Path) -> Path:
        """``<run_dir>/summary.json``; the one command writes it once, when its last step ends (``conclude``)."""
        path = Path(run_dir) / SUMMARY_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


# the keys before ``final_model``: one field each, written as they are
PLAIN_HEAD = tuple(takewhile(lambda name: name != "final_model", (f.name for f in fields(RunSummary))))


def _put(out: dict, **optional) -> None:
    """The optional keys that are set (not None)."""
    out.update({key: value for key, value in optional.items() if value is not None})


def he_summary(events: list[dict], param_count: int | None = None) -> HeCosts | None:
    """HE costs from ``[spleen-he]`` events: per-round seconds per stage and one client update's size.

    ``<stage>_s[r]`` is round r's time (the slowest participant), ``None`` where round r had no such step (no
    decryption in round 0: the initial global model is plaintext). Only training rounds count (``task=train``,
    or no task, and an integer ``round``): cross-site evaluation's encrypt/decrypt lines are left out. ``None``
    without such events (not an HE job).
    """
    train = [e for e in events if e.get("task", "train") == "train" and isinstance(e.get("round"), int)]
    if not train:
        return None
    last_round = max(e["round"] for e in train)
    stages: dict[str, list[float | None]] = {}
    for stage in HE_STAGES:
        per_round: dict[int, float] = {}
        for e in train:
            if e.get("stage") == stage and isinstance(e.get("seconds"), float | int):
                per_round[e["round"]] = max(per_round.get(e["round"], 0.0), float(e["seconds"]))
        stages[f"{stage}_s"] = [per_round.get(r) for r in range(last_round + 1)]
    client_enc = [
        e
        for e in train
        if e.get("stage") == "encrypt" and e.get("side") != "server" and isinstance(e.get("bytes"), int)
    ]
    if not client_enc:
        return HeCosts(**stages)
    first = min(client_enc, key=lambda e: (e["round"], str(e.get("side"))))
    plain = first.get("plain_bytes")
    if not isinstance(plain, int) and param_count:
        plain = 4 * param_count  # float32 weights
    ratio = round(first["bytes"] / plain, 2) if isinstance(plain, int) and plain > 0 else None
    return HeCosts(**stages, update_bytes_encrypted=first["bytes"], update_bytes_plain=plain, update_bytes_ratio=ratio)


def build_summary(
    *,
    settings: ExperimentSettings,
    job_id: str | None,
    status: str | None,
    sites: list[str],
    wall_time_s: float,
    progress: Progress,
    cross_site_results: dict | None,
    tracking: Tracking | None,
    paths: dict[str, str | None],
    param_count: int | None = None,
    model_history: list[dict] | None = None,
    job_errors: list[str] | None = None,
    server_peak_memory_mb: float | None = None,
    resumed: list[dict] | None = None,
) -> RunSummary:
    """The record of a finished job: the progress events and downloaded results, plus what the run's own steps
    found (``job_errors``: a policy's refusals, after the server's own; the server's peak memory; resumes)."""
    cross_site = cross_site_by_model(cross_site_results or {})
    per_round = {
        str(r): {s: e.get("global_dice") for s, e in sorted(progress.per_round[r].items())}
        for r in sorted(progress.per_round)
    }
    if progress.final_dice:  # the last global model, scored as if round N started (N: rounds trained, which a
        # DP budget may end early)
        trained = max(progress.per_round) + 1 if progress.per_round else settings.rounds
        per_round[str(trained)] = dict(sorted(progress.final_dice.items()))
    choice = model_choice(model_history or [])
    return RunSummary(
        job_id=job_id,
        job_name=settings.job_name,
        status=status,
        sites=sites,
        rounds=settings.rounds,
        local_epochs=settings.local_epochs,
        quick=settings.quick,
        data=str(settings.data) if settings.data else "synthetic",
        wall_time_s=round(wall_time_s, 1),
        round_times_s=progress.round_times(),
        fl_round_s=progress.fl_round_times(),
        site_work_s=progress.site_work_times(),
        untrained_dice=progress.untrained_dice(),
        devices=dict(sorted(progress.devices.items())),
        gpu_peak_mb=dict(sorted(progress.gpu_peak_mb.items())),
        data_errors=progress.data_errors,
        job_errors=[*progress.job_errors, *(job_errors or [])],
        dropped=progress.dropped,
        global_dice_per_round=per_round,
        final_global_dice=cross_site.get(GLOBAL_MODEL, {}),
        final_model=choice.get("final_model"),
        best_model=choice.get("best_model"),
        cross_site=cross_site,
        tracking=tracking,
        paths=paths,
        he=he_summary(progress.he_events, param_count),
        dp=dp_summary(progress),
        server_peak_memory_mb=server_peak_memory_mb,
        resumed=resumed or [],
    )


def dp_summary(progress: Progress) -> dict | None:
    """A DP job's privacy per site: epsilon after each round (at the delta the sites report), noise, steps."""
    epsilons = progress.dp_epsilons()
    if not epsilons:
        return None
    last = {s: e for r in sorted(progress.per_round) for s, e in progress.per_round[r].items() if "dp_epsilon" in e}
    deltas = sorted({str(e.get("dp_delta")) for e in last.values()})
    return {
        "delta": float(deltas[0]) if len(deltas) == 1 else deltas,
        "epsilon_per_round": epsilons,
        "final_epsilon": {s: float(e["dp_epsilon"]) for s, e in sorted(last.items())},
        "noise_multiplier": {s: e.get("dp_noise_multiplier") for s, e in sorted(last.items())},
        "steps": {s: e.get("dp_steps") for s, e in sorted(last.items())},
    }


def problems(summary: RunSummary, sites: list[str], terminal_ok: tuple[str, ...]) -> list[str]:
    """What makes a finished run a failure: a job that did not complete, or missing cross-site results."""
    # a site's own check of its cases, or a resume the server refused: the cause, so first
    found = [*summary.data_errors, *summary.job_errors]
    finished_all = len(summary.fl_round_s) == summary.rounds
    excused = summary.status_note and finished_all  # see abandoned_upload
    if summary.status not in terminal_ok and not excused:
        found.append(f"job ended {summary.status}")
    cross_site = summary.cross_site
    present = [s for s in sites if s not in {d["site"] for d in summary.dropped}]  # dropped: reported
    if not cross_site:
        found.append("no cross-site results in the downloaded job")
    elif any(set(present) - set(v) for v in cross_site.values()) or GLOBAL_MODEL not in cross_site:
        found.append("the cross-site table is incomplete")
    tracked = tracked_sites(summary)
    if tracked is not None and set(sites) - tracked:
        found.append(f"no metrics of {', '.join(sorted(set(sites) - tracked))} in the tracking store")
    return found


def tracked_sites(summary: RunSummary) -> set[str] | None:
    """Sites with a run (MLflow, W&B) or event files (TensorBoard); None where the summary says nothing of
    tracking."""
    tracking = summary.tracking
    if tracking is None:
        return None
    if tracking.tensorboard is not None:
        return set(tracking.tensorboard.get("site_dirs") or {})
    if tracking.wandb is not None:
        return set(tracking.wandb.get("run_files") or {})
    return set((tracking.mlflow or {}).get("run_ids") or {})
