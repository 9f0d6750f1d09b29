"""Server-side pieces of the HE job: add packed CKKS updates, carry the sum as the global model.

The design and the reasons for it: docs/design.md, "spleen_flare/he/aggregator.py".
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import (
    ModelLearnable,
    ModelLearnableKey,
    make_model_learnable,
    model_learnable_to_dxo,
)
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS
from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace

from spleen_flare.he.filters import he_log_line
from spleen_flare.he.keys import key_fingerprint
from spleen_flare.he.packing import HE_META_KEY, PackedSum, packed_bytes
from spleen_flare.he.validation import _is_int, brief, short_message


def model_values(model: Any) -> int | None:
    """How many float values the global model holds (the bound on what an update may declare); None if unknown.

    A packed global model (an aggregate) says it in its layout; the plaintext initial model is counted.
    """
    if not isinstance(model, dict):
        return None
    meta = model.get(ModelLearnableKey.META) or {}
    he_meta = meta.get(HE_META_KEY) if isinstance(meta, dict) else None
    if isinstance(he_meta, dict):
        n_values = he_meta.get("n_values")
        return int(n_values) if _is_int(n_values) and n_values > 0 else None
    weights = model.get(ModelLearnableKey.WEIGHTS)
    if not isinstance(weights, dict) or not weights:
        return None
    arrays = [np.asarray(v) for v in weights.values()]
    return sum(a.size for a in arrays if a.dtype.kind == "f") or None


class PackedHEAggregator(Aggregator):
    """Adds packed, pre-weighted CKKS updates of one round (in time, as they arrive)."""

    def __init__(self, tenseal_context_file: str = "server_context.tenseal") -> None:
        super().__init__()
        self.tenseal_context_file = tenseal_context_file
        self.tenseal_context = None
        self.key_fingerprint: str | None = None  # of tenseal_context, computed once per run
        self._lock = threading.RLock()  # reentrant: accept() may run START_RUN handling
        self._sum: PackedSum | None = None
        self._contributors: set[str] = set()
        self._add_seconds = 0.0
        numpy_decomposers.register()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.tenseal_context = load_tenseal_context_from_workspace(self.tenseal_context_file, fl_ctx)
            if self.tenseal_context.is_private():
                raise ValueError(
                    f"{self.tenseal_context_file} holds a secret key: the server must have the public context only"
                )
            self.key_fingerprint = None
            self.reset(fl_ctx)
        elif event_type == EventType.END_RUN:
            self.tenseal_context = None
            self.key_fingerprint = None

    def _new_sum(self) -> PackedSum:
        if self.key_fingerprint is None:
            self.key_fingerprint = key_fingerprint(self.tenseal_context)
        return PackedSum(self.tenseal_context, self.key_fingerprint)

    def reset(self, fl_ctx: FLContext) -> None:
        with self._lock:
            self._sum = self._new_sum() if self.tenseal_context is not None else None
            self._contributors = set()
            self._add_seconds = 0.0

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        contributor = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        try:
            return self._accept(shareable, contributor, fl_ctx)
        except Exception as err:  # any failure is this one site's: its update is refused, the round goes on
            reason = (
                short_message(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {short_message(err)}"
            )
            if not reason.startswith(f"{contributor}'s"):
                reason = f"refused {contributor}'s update: {reason}"
            self.log_error(fl_ctx, reason)
            return False

    def _accept(self, shareable: Shareable, contributor: str, fl_ctx: FLContext) -> bool:
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            self.log_warning(fl_ctx, f"{contributor} returned rc {rc}: contribution disregarded")
            return False
        dxo = from_shareable(shareable)
        he_meta = (dxo.meta or {}).get(HE_META_KEY)
        if dxo.data_kind != DataKind.WEIGHTS or he_meta is None:
            self.log_error(fl_ctx, f"{contributor} sent {dxo.data_kind} without packed CKKS data: refused")
            return False
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if contribution_round != current_round:
            self.log_warning(fl_ctx, f"{contributor}: result of round {contribution_round} in round {current_round}")
            return False
        with self._lock:
            if self._sum is None:  # reset() ran before START_RUN loaded the context
                if self.tenseal_context is None:
                    self.handle_event(EventType.START_RUN, fl_ctx)
                self._sum = self._new_sum()
            if contributor in self._contributors:
                self.log_warning(fl_ctx, f"{contributor} already contributed in round {current_round}")
                return False
            contributions = he_meta.get("contributions") if isinstance(he_meta, dict) else None
            if type(contributions) is not int or contributions != 1:
                self.log_error(
                    fl_ctx,
                    f"refused {contributor}'s update: it claims {brief(contributions)} contributions, a site sends 1",
                )
                return False
            start = time.perf_counter()
            bound = model_values(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL))
            self._sum.add(dxo.data, he_meta, sender=contributor, max_values=bound)
            self._add_seconds += time.perf_counter() - start
            self._contributors.add(contributor)
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        with self._lock:
            if self._sum is None or self._sum.count == 0:
                raise ValueError("no packed HE updates were accepted this round")
            start = time.perf_counter()
            data, he_meta = self._sum.result()
            serialize_seconds = time.perf_counter() - start
            add_seconds = self._add_seconds
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        self.logger.info(
            he_log_line(
                "server",
                "aggregate",
                "train",
                rnd if isinstance(rnd, int) else None,
                add_seconds + serialize_seconds,
                add_s=add_seconds,
                serialize_s=serialize_seconds,
                contributions=he_meta["contributions"],
                bytes=packed_bytes(data),
                weight=float(he_meta["weight"]),
            )
        )
        meta = {HE_META_KEY: he_meta, MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM_CKKS}
        return DXO(data_kind=DataKind.WEIGHTS, data=data, meta=meta).to_shareable()


class PackedHEShareableGenerator(ShareableGenerator):
    """Global model <-> task data, unchanged: plaintext at the start, packed ciphertexts + total weight after."""

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        return model_learnable_to_dxo(model).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS or HE_META_KEY not in (dxo.meta or {}):
            raise ValueError(f"expected a packed CKKS aggregate (DataKind.WEIGHTS), got {dxo.data_kind}")
        return make_model_learnable(dxo.data, dict(dxo.meta))
