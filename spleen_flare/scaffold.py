"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct each site's drift towards its own data.

The server keeps the global control variate c, one tensor per trainable parameter of the bundle's network, and
sends it with the global model under ``CONTROL_PREFIX`` keys. Each site keeps its own c_i; after every optimizer
step of the bundle's trainer it moves its weights by -lr x (c - c_i) and, after the round, it updates c_i from how
far it moved (NVFlare's ``PTScaffoldHelper``: ``BundleRunner.use_scaffold``). The site returns c + delta c_i under
the same keys, so the Client API's DIFF sends delta c_i beside the weight update; the job's aggregator averages
both (weighted by local steps, as NVFlare's own SCAFFOLD does) and this generator adds the average to c and the
rest to the global model. The persisted global model never holds a control variate.

The server adds the controls in plaintext: SCAFFOLD is not built for the HE job. A job that resumes starts its
controls from zero (they are not persisted).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.learnable import Learnable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

from spleen_flare.bundle_runner import build_network
from spleen_flare.contract import BUNDLE_NAME
from spleen_flare.contract import SCAFFOLD_CONTROL_PREFIX as CONTROL_PREFIX


def split_controls(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` as (the model's weights, the control variates by parameter name); the input is left as it is
    (the Client API diffs against the received dict)."""
    weights = {k: v for k, v in params.items() if not k.startswith(CONTROL_PREFIX)}
    controls = {k[len(CONTROL_PREFIX) :]: v for k, v in params.items() if k.startswith(CONTROL_PREFIX)}
    return weights, controls


def with_controls(weights: Mapping[str, Any], controls: Mapping[str, Any]) -> dict[str, Any]:
    return {**weights, **{CONTROL_PREFIX + k: v for k, v in controls.items()}}


class ScaffoldShareableGenerator(FullModelShareableGenerator):
    """The global model with the global control variate c beside it; the sites' averaged delta c added to c."""

    def __init__(self, config_files: str = "configs/train.json") -> None:
        super().__init__()
        self.config_files = [f.strip() for f in config_files.split(",") if f.strip()]
        self.controls: dict[str, np.ndarray] = {}
        self.updates = 0  # control updates applied in this run

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.START_RUN:
            return
        app_root = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
        network = build_network(app_root / "config" / BUNDLE_NAME, self.config_files)
        self.controls = {
            name: np.zeros(tuple(p.shape), dtype=np.float32)
            for name, p in network.named_parameters()
            if p.requires_grad
        }
        self.log_info(fl_ctx, f"SCAFFOLD: {len(self.controls)} control variates, starting from zero")

    def learnable_to_shareable(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        weights = model_learnable[ModelLearnableKey.WEIGHTS]
        meta = model_learnable.get(ModelLearnableKey.META)
        return DXO(DataKind.WEIGHTS, data=with_controls(weights, self.controls), meta=meta).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> Learnable:
        dxo = from_shareable(shareable)
        if dxo.data_kind == DataKind.WEIGHT_DIFF and dxo.data:
            diff, delta_controls = split_controls(dxo.data)
            unknown = sorted(set(delta_controls) - set(self.controls))
            if unknown:
                raise ValueError(f"SCAFFOLD: control updates for parameters the network lacks: {unknown[:3]}")
            for name, delta in delta_controls.items():
                self.controls[name] = (self.controls[name] + np.asarray(delta, dtype=np.float32)).astype(np.float32)
            missing = len(self.controls) - len(delta_controls)
            if missing:
                self.log_warning(fl_ctx, f"SCAFFOLD: no control update for {missing} parameters this round")
            self.updates += 1
            norm = float(np.sqrt(sum(float(np.square(c).sum()) for c in self.controls.values())))
            self.log_info(fl_ctx, f"SCAFFOLD: global control norm {norm:.6g} after update {self.updates}")
            shareable = DXO(DataKind.WEIGHT_DIFF, data=diff, meta=dxo.meta).to_shareable()
        return super().shareable_to_learnable(shareable, fl_ctx)
