"""FedOpt (Reddi et al. 2021) on NVFlare's ``PTFedOptModelShareableGenerator``: the server applies the sites'
averaged update to the global model with an optimizer of its own (SGD with momentum, or Adam), instead of adding it.

NVFlare's generator builds its optimizer from a class path in the job (``optimizer_args.path``), which would let a
job name any class for the server to build; here the job names one of ``OPTIMIZERS`` and its numbers only. Its
model is the bundle's network (the one the persistor builds), and before each update it is set to the current
global model, so the optimizer steps from the model the sites trained on (also in a job that resumed); the new
global model it returns is a copy (NVFlare's returns views of the optimizer's parameters, which its next step would
change in place).
The server must read the averaged update: FedOpt does not run under HE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.learnable import Learnable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.pt.fedopt import PTFedOptModelShareableGenerator

from spleen_flare.bundle_runner import build_network, to_tensor_dict
from spleen_flare.contract import BUNDLE_NAME

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


class BundleFedOptShareableGenerator(PTFedOptModelShareableGenerator):
    """FedOpt with the bundle's network and an optimizer named by the job (``sgd``: ``lr``, ``momentum``; ``adam``:
    ``lr``, ``betas``, ``eps``)."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.6,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        config_files: str = "configs/train.json",
        device: str = "cpu",
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"FedOpt optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"FedOpt lr must be positive, got {lr}")
        super().__init__(optimizer_args={"path": optimizer}, source_model=None, device=device)
        self.optimizer_kind = optimizer
        self.optimizer_numbers = (
            {"lr": lr, "momentum": momentum}
            if optimizer == "sgd"
            else {
                "lr": lr,
                "betas": tuple(betas),
                "eps": eps,
            }
        )
        self.config_files = [f.strip() for f in config_files.split(",") if f.strip()]

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.START_RUN:
            return
        app_root = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
        self.device = torch.device(self.device)
        self.model = build_network(app_root / "config" / BUNDLE_NAME, self.config_files).to(self.device)
        self.optimizer = OPTIMIZERS[self.optimizer_kind](self.model.parameters(), **self.optimizer_numbers)
        self.optimizer_name = self.optimizer_kind
        self.log_info(fl_ctx, f"FedOpt: {self.optimizer_kind} {self.optimizer_numbers} on the server")

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> Learnable:
        base = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = base[ModelLearnableKey.WEIGHTS] if base else None
        if weights:  # the optimizer's model is the global model the sites started from
            with torch.no_grad():
                state = self.model.state_dict()
                state.update({k: v.to(self.device) for k, v in to_tensor_dict(weights).items() if k in state})
                self.model.load_state_dict(state)
        learnable = super().shareable_to_learnable(shareable, fl_ctx)
        # NVFlare hands back numpy views of the optimizer's own parameters: copies, or the next round's step would
        # change this round's global model (and whatever kept it) in place
        new = learnable.get(ModelLearnableKey.WEIGHTS) or {}
        for key, value in new.items():
            new[key] = value.copy() if isinstance(value, np.ndarray) else value
        return learnable
