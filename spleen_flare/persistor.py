"""Server-side persistor whose initial global model is the bundle's ``network_def``."""

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

HISTORY_FILE = "global_model_history.json"


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
        bundle: str = "config/spleen_ct_segmentation",
        config_files: str = "configs/train.json",
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bundle = bundle
        self.config_files = [f.strip() for f in config_files.split(",") if f.strip()]
        self.seed = seed

    def _initialize(self, fl_ctx: FLContext) -> None:
        if self.model is None:
            app_root = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
            self.model = build_network(app_root / self.bundle, self.config_files, seed=self.seed)
        super()._initialize(fl_ctx)

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        ml = super().load_model(fl_ctx)
        self._record(ml, "initial")
        return ml

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        super().save_model(ml, fl_ctx)
        self._record(ml, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))

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
        history.append(entry)
        tmp = history_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(history, indent=2))
        os.replace(tmp, history_path)
