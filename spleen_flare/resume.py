"""Resuming a federated job from the global model its server persisted last, after the server died.

The design and the reasons for it: docs/design.md, "spleen_flare/resume.py".
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from spleen_flare.contract import JOB_ID_PATTERN, KEY_METRIC

HISTORY_FILE = "global_model_history.json"
RESUME_POINT_PROP = "spleen.resume_point"  # FLContext property (sticky) the persistor sets when it resumes
RESUMED_EVENT = "spleen.resumed"  # fired by the persistor once the old model is loaded


class ResumeError(RuntimeError):
    """The job cannot resume from the named job; the message says why and what to do."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed job starts: the old job's last persisted global model and its place in the history."""

    job_id: str
    app_dir: Path  # the old job's app_server folder
    next_round: int  # the first round the resumed job runs
    history: list[dict] = field(default_factory=list)  # the old history up to the loaded model
    best: dict | None = None  # the old history's last best entry, when the best checkpoint still holds it

    @property
    def best_metric(self) -> float | None:
        value = (self.best or {}).get(KEY_METRIC)
        return float(value) if isinstance(value, (int, float)) else None


def old_app_dir(app_root: Path, job_id: str) -> Path:
    """The named job's server app folder, beside this job's (``<workspace>/<job id>/app_server``)."""
    if not JOB_ID_PATTERN.fullmatch(job_id or ""):
        raise ResumeError(f"resume_from {job_id!r} is not a job id; give the id `nvflare job list` shows")
    return Path(app_root).parents[1] / job_id / Path(app_root).name


def read_history(app_dir: Path) -> list[dict]:
    path = app_dir / HISTORY_FILE
    try:
        history = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResumeError(f"{path}: missing; the job never started a round, submit it again afresh") from None
    except ValueError as err:
        raise ResumeError(f"{path}: unreadable ({err}); submit the job again afresh") from None
    if not isinstance(history, list):
        raise ResumeError(f"{path}: not a list of rounds; submit the job again afresh")
    return history


def locate(history: list[dict], digest: str | None, app_dir: Path) -> int:
    """Index of the history entry of the model with ``digest`` (the last one that has it); ``digest`` None: the
    old job saved no global model yet, so it resumes from the initial model."""
    models = [i for i, e in enumerate(history) if not e.get("best") and "round" in e]
    if digest is None:
        initial = [i for i in models if history[i]["round"] == "initial"]
        if not initial:
            raise ResumeError(f"{app_dir / HISTORY_FILE}: no initial model recorded; submit the job again afresh")
        return initial[-1]
    found = [i for i in models if history[i].get("sha256") == digest]
    if not found:
        raise ResumeError(
            f"{app_dir}: its global model matches no round of {HISTORY_FILE} (the files are from different runs); "
            "submit the job again afresh"
        )
    return found[-1]


def resume_point(
    job_id: str,
    app_dir: Path,
    model_digest: str | None,
    best_digest: str | None,
) -> ResumePoint:
    """The point after the model whose digest is ``model_digest``. Later entries (a round recorded whose
    checkpoint was never written) are dropped, except best entries of models up to it; the last best entry counts
    only when ``best_digest`` (the old best checkpoint) is that model."""
    history = read_history(app_dir)
    at = locate(history, model_digest, app_dir)
    label = history[at]["round"]
    next_round = 0 if label == "initial" else int(label) + 1
    # a model is found best during the next round, so its best entry may follow the round's own entry
    later_bests = [e for e in history[at + 1 :] if e.get("best") and isinstance(e.get("round"), int)]
    kept = history[: at + 1] + [e for e in later_bests if e["round"] < next_round]
    bests = [e for e in kept if e.get("best")]
    best = bests[-1] if bests and best_digest and bests[-1].get("sha256") == best_digest else None
    return ResumePoint(job_id=job_id, app_dir=app_dir, next_round=next_round, history=kept, best=best)


def carry_best_model(point: ResumePoint, best_file: str, to_dir: Path) -> None:
    """The old best checkpoint into the new job's folder, when it is the history's best model."""
    if point.best is not None:
        shutil.copy2(point.app_dir / best_file, Path(to_dir) / best_file)
