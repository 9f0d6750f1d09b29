"""Server-side persistor whose initial global model is the bundle's ``network_def``, and that can resume a job
from the global model an earlier job of this server persisted last (``resume_from``; see ``spleen_flare.resume``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from spleen_flare.bundle_runner import build_network
from spleen_flare.contract import BUNDLE_NAME, PROGRESS_TAG, tagged_line
from spleen_flare.resume import (
    HISTORY_FILE,
    RESUME_POINT_PROP,
    RESUMED_EVENT,
    ResumeError,
    ResumePoint,
    carry_best_model,
    old_app_dir,
    resume_point,
)
from spleen_flare.site_install import job_problems


def weights_digest(weights: dict) -> str:
    """sha256 over the sorted weight arrays: equal digests mean equal models."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(np.asarray(weights[name], dtype=np.float32)).tobytes())
    return digest.hexdigest()


class BundleModelPersistor(PTFileModelPersistor):
    """Builds the initial model from the bundle (seeded) and records a digest of the global model per round.

    ``global_model_history.json`` (next to ``FL_global_model.pt``) lists ``{"round", "sha256"}`` entries, so a
    reader can check the global model really changed from round to round without keeping every checkpoint. Each
    new best global model adds ``{"best": true, "round", "sha256", "<key metric>"}``, where ``round`` is the
    history round of that model (the aggregate of that round), so the last such entry names the saved best model.
    """

    def __init__(
        self,
        config_files: str = "configs/train.json",
        seed: int = 0,
        resume_from: str = "",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.config_files = [f.strip() for f in config_files.split(",") if f.strip()]
        self.seed = seed
        self.resume_from = resume_from.strip()  # an earlier job of this server to go on from ("": start afresh)
        self.resume_point: ResumePoint | None = None

    def _initialize(self, fl_ctx: FLContext) -> None:
        if self.model is None:
            app_root = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
            problems = job_problems(app_root, "server")
            for problem in problems:
                self.log_error(fl_ctx, tagged_line(PROGRESS_TAG, kind="install_error", site="server", problem=problem))
            if problems:
                self.system_panic(problems[0], fl_ctx)
                raise RuntimeError(problems[0])
            self.model = build_network(app_root / "config" / BUNDLE_NAME, self.config_files, seed=self.seed)
        super()._initialize(fl_ctx)

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        if self.resume_from:
            return self._resume(fl_ctx)
        ml = super().load_model(fl_ctx)
        self._record(ml, "initial")
        return ml

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        # the history first: a checkpoint whose digest is not in the history yet could not be placed on resume
        self._record(ml, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        super().save_model(ml, fl_ctx)

    # -- resuming ----------------------------------------------------------------------------------------
    def model_digest(self, ml: ModelLearnable) -> str:
        return weights_digest(ml[ModelLearnableKey.WEIGHTS])

    def _read_digest(self, path: Path, fl_ctx: FLContext) -> str | None:
        if not path.is_file():
            return None
        ml = self._get_model_from_location(str(path), fl_ctx)
        if ml is None:
            raise ResumeError(f"{path}: cannot be read as a global model; submit the job again afresh")
        return self.model_digest(ml)

    def _resume(self, fl_ctx: FLContext) -> ModelLearnable | None:
        """The old job's last global model, its history carried over, the point announced (once)."""
        try:
            point = self.resume_point or self._find_point(fl_ctx)
        except ResumeError as err:
            reason = f"cannot resume from job {self.resume_from}: {err}"
            self.log_error(fl_ctx, tagged_line(PROGRESS_TAG, kind="resume_error", site="server", reason=reason))
            self.system_panic(reason, fl_ctx)
            return None
        if point.next_round > 0:
            ml = self.adopt(point.app_dir / self.global_model_file_name, fl_ctx)
        else:  # nothing persisted yet: the seeded initial model, the same as the old job's
            ml = PTFileModelPersistor.load_model(self, fl_ctx)
        if self.resume_point is None:
            self.resume_point = point
            self._carry_over(point, fl_ctx)
        return ml

    def _find_point(self, fl_ctx: FLContext) -> ResumePoint:
        old = old_app_dir(Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)), self.resume_from)
        if not old.is_dir():
            raise ResumeError(
                f"{old}: no such job folder on this server; resume_from must name a job this server ran "
                "(`nvflare job list`), or submit the job afresh"
            )
        return resume_point(
            self.resume_from,
            old,
            self._read_digest(old / self.global_model_file_name, fl_ctx),
            self._read_digest(old / self.best_global_model_file_name, fl_ctx),
        )

    def adopt(self, model_path: Path, fl_ctx: FLContext) -> ModelLearnable:
        """The old checkpoint as this job's global model (NVFlare's own checkpoint loading)."""
        self.source_ckpt_file_full_name = str(model_path)
        return super().load_model(fl_ctx)

    def _carry_over(self, point: ResumePoint, fl_ctx: FLContext) -> None:
        self.write_history([*point.history, {"resumed_from": point.job_id, "next_round": point.next_round}])
        self.save_model_file(self._ckpt_save_path)  # this job's folder holds its global model from the start
        carry_best_model(point, self.best_global_model_file_name, Path(self.log_dir))
        fl_ctx.set_prop(RESUME_POINT_PROP, point, private=True, sticky=True)
        line = tagged_line(PROGRESS_TAG, kind="resumed", site="server", job=point.job_id, round=point.next_round)
        self.log_info(fl_ctx, f"{line} (best so far: {point.best})")
        self.fire_event(RESUMED_EVENT, fl_ctx)

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        super().handle_event(event, fl_ctx)
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            ml = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            weights = ml.get(ModelLearnableKey.WEIGHTS) if isinstance(ml, dict) else None
            if weights:
                self.record_best(weights_digest(weights), fl_ctx)

    def _record(self, ml: ModelLearnable | None, round_label: int | str | None) -> None:
        weights = ml.get("weights") if isinstance(ml, dict) else None
        if weights:
            self.append_history({"round": round_label, "sha256": weights_digest(weights)})

    def record_best(self, digest: str, fl_ctx: FLContext) -> None:
        """A history entry for the new best model. The selectors name the round whose sites scored it (they score
        the model they receive), so the model itself is the aggregate of the round before."""
        info = fl_ctx.get_prop(AppConstants.METRICS_SELECTION_INFO) or {}
        scored = info.get("best_round")
        entry = {"best": True, "round": scored - 1 if isinstance(scored, int) else None, "sha256": digest}
        entry.update(info.get("best_metrics") or {})
        self.append_history(entry)

    def append_history(self, entry: dict) -> None:
        history_path = Path(self.log_dir) / HISTORY_FILE
        history = json.loads(history_path.read_text()) if history_path.is_file() else []
        self.write_history([*history, entry])

    def write_history(self, history: list[dict]) -> None:
        history_path = Path(self.log_dir) / HISTORY_FILE
        tmp = history_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(history, indent=2))
        os.replace(tmp, history_path)
