"""Client-side filters of the HE job: pack + encrypt what a site sends, decrypt + unpack what it receives.

The design and the reasons for it: docs/design.md, "spleen_flare/he/filters.py".
"""

from __future__ import annotations

import time

from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS
from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace

from spleen_flare.contract import HE_TAG, tagged_line
from spleen_flare.he.fingerprint import KEY_FINGERPRINT_FILE, load_kit_fingerprint
from spleen_flare.he.packing import HE_META_KEY, decrypt_model, encrypt_model, packed_bytes


def _round_of(shareable: Shareable, fl_ctx: FLContext) -> int | None:
    for value in (
        shareable.get_header(AppConstants.CURRENT_ROUND),
        shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND),
        fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
    ):
        if isinstance(value, int):
            return value
    return None


def he_log_line(side: str, stage: str, task: str | None, rnd: int | None, seconds: float, **fields) -> str:
    """One ``[spleen-he]`` line (see ``spleen_flare.contract``); ``round`` only when known."""
    where = {"round": rnd} if rnd is not None else {}
    return tagged_line(HE_TAG, side=side, stage=stage, task=task or "?", **where, seconds=seconds, **fields)


class _SiteContextFilter(DXOFilter):
    """A DXO filter that holds the site's TenSEAL context (with secret key) and key fingerprint for a job."""

    def __init__(self, tenseal_context_file: str, key_fingerprint_file: str) -> None:
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        self.tenseal_context_file = tenseal_context_file
        self.key_fingerprint_file = key_fingerprint_file
        self.tenseal_context = None
        self.key_fingerprint: str | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.tenseal_context = None
            self.key_fingerprint = None
            self.load_kit(fl_ctx)
        elif event_type == EventType.END_RUN:
            self.tenseal_context = None
            self.key_fingerprint = None

    def load_kit(self, fl_ctx: FLContext) -> None:
        """The context and the key fingerprint from the site's startup kit, where not loaded yet."""
        if self.tenseal_context is None:
            self.tenseal_context = load_tenseal_context_from_workspace(self.tenseal_context_file, fl_ctx)
        if self.key_fingerprint is None:
            self.key_fingerprint = load_kit_fingerprint(fl_ctx, self.key_fingerprint_file)


class PackedHEEncryptor(_SiteContextFilter):
    """Encrypts a WEIGHTS result into packed, weighted, lowest-level CKKS ciphertexts (see the module doc)."""

    def __init__(
        self,
        tenseal_context_file: str = "client_context.tenseal",
        weigh_by_local_iter: bool = True,
        weight_scale: float = 1.0,
        max_clients: int = 8,
        key_fingerprint_file: str = KEY_FINGERPRINT_FILE,
    ) -> None:
        """
        Args:
            tenseal_context_file: the site's TenSEAL context (with secret key) from provisioning.
            weigh_by_local_iter: weight = local steps (DXO meta NUM_STEPS_CURRENT_ROUND) x weight_scale; else 1.
            weight_scale: multiplies the step count; lower it if the CKKS range check fails.
            max_clients: how many updates the server may add up (the range check allows for that many, and the
                server refuses more).
            key_fingerprint_file: the provisioning's key fingerprint in the site's startup kit.
        """
        super().__init__(tenseal_context_file, key_fingerprint_file)
        self.weigh_by_local_iter = weigh_by_local_iter
        self.weight_scale = float(weight_scale)
        self.max_clients = int(max_clients)

    def aggregation_weight(self, dxo: DXO) -> float:
        if not self.weigh_by_local_iter:
            return 1.0
        steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        if not isinstance(steps, int | float) or steps <= 0:
            raise ValueError(f"HE encryptor: weigh_by_local_iter needs a positive NUM_STEPS_CURRENT_ROUND, got {steps}")
        return float(steps) * self.weight_scale

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(
                f"HE encryptor expects full weights (DataKind.WEIGHTS), got {dxo.data_kind}: set "
                '"params_transfer_type": "FULL" in config_fed_client.json'
            )
        if HE_META_KEY in (dxo.meta or {}):  # the site's own policy encrypted it first (spleen_flare.site_filters)
            return None
        self.load_kit(fl_ctx)
        weight = self.aggregation_weight(dxo)
        plain_bytes = sum(getattr(v, "nbytes", 0) for v in dxo.data.values())
        start = time.perf_counter()
        data, he_meta = encrypt_model(
            dxo.data, self.tenseal_context, weight, self.max_clients, key=self.key_fingerprint
        )
        seconds = time.perf_counter() - start
        meta = dict(dxo.meta or {})
        meta[HE_META_KEY] = he_meta
        meta[MetaKey.PROCESSED_ALGORITHM] = HE_ALGORITHM_CKKS
        enc_bytes = packed_bytes(data)
        line = he_log_line(
            fl_ctx.get_identity_name(default="?"),
            "encrypt",
            fl_ctx.get_prop(FLContextKey.TASK_NAME),
            _round_of(shareable, fl_ctx),
            seconds,
            bytes=enc_bytes,
            plain_bytes=plain_bytes,
            ratio=round(enc_bytes / max(plain_bytes, 1), 2),
            ciphertexts=he_meta["chunks"],
            weight=float(weight),
        )
        self.logger.info(line)  # the job's log.txt, which the one command follows (print() would miss it)
        return DXO(data_kind=DataKind.WEIGHTS, data=data, meta=meta)


class PackedHEDecryptor(_SiteContextFilter):
    """Decrypts packed models with the site's secret key and divides by the total weight."""

    def __init__(
        self, tenseal_context_file: str = "client_context.tenseal", key_fingerprint_file: str = KEY_FINGERPRINT_FILE
    ) -> None:
        super().__init__(tenseal_context_file, key_fingerprint_file)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        he_meta = (dxo.meta or {}).get(HE_META_KEY)
        if he_meta is None:
            self.log_info(fl_ctx, "plaintext model (the initial global model is not encrypted): passed through")
            return None
        self.load_kit(fl_ctx)
        start = time.perf_counter()
        params = decrypt_model(dxo.data, he_meta, self.tenseal_context, key=self.key_fingerprint)
        seconds = time.perf_counter() - start
        meta = {k: v for k, v in (dxo.meta or {}).items() if k not in (HE_META_KEY, MetaKey.PROCESSED_ALGORITHM)}
        line = he_log_line(
            fl_ctx.get_identity_name(default="?"),
            "decrypt",
            fl_ctx.get_prop(FLContextKey.TASK_NAME),
            _round_of(shareable, fl_ctx),
            seconds,
            bytes=packed_bytes(dxo.data),
            contributions=he_meta["contributions"],
            weight=float(he_meta["weight"]),
        )
        self.logger.info(line)
        return DXO(data_kind=DataKind.WEIGHTS, data=params, meta=meta)
