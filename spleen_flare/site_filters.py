"""Filters a site puts in its own privacy policy (``local/privacy.json``), applied to every job whatever it says.

NVFlare runs a site's scope filters before the job's own, on every task. ``SiteHEEncryptor`` encrypts every model a
site sends (the HE job's own encryptor then finds it encrypted and passes it on); a plain job's update leaves
encrypted too, so the plain server cannot use it and no plaintext weight leaves the site. ``SiteHEDecryptor``
decrypts what the HE server sends. ``KeepLocalModel`` answers cross-site evaluation's ``submit_model`` without the
model. The policy file itself is written by ``spleen_tools.systems.site_policy``.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from spleen_flare.contract import PROGRESS_TAG, tagged_line
from spleen_flare.he.filters import PackedHEDecryptor, PackedHEEncryptor
from spleen_flare.he.packing import HE_META_KEY


def _task(fl_ctx: FLContext) -> str:
    return str(fl_ctx.get_prop(FLContextKey.TASK_NAME) or "")


class SiteHEEncryptor(PackedHEEncryptor):
    """Every model result leaves encrypted: weighted by local steps for ``train``, by 1 otherwise; a plain job's
    weight difference too (the plain server cannot aggregate it: the round fails, no plaintext leaves)."""

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if HE_META_KEY in (dxo.meta or {}):
            return None
        self.weigh_by_local_iter = _task(fl_ctx) == AppConstants.TASK_TRAIN
        if dxo.data_kind == DataKind.WEIGHT_DIFF:  # encrypted all the same: the site's rule, not the job's
            dxo = DXO(data_kind=DataKind.WEIGHTS, data=dxo.data, meta=dxo.meta)
        return super().process_dxo(dxo, shareable, fl_ctx)


class SiteHEDecryptor(PackedHEDecryptor):
    """What the HE server sends, decrypted with the site's key (plaintext passes, as in the job's decryptor)."""


class KeepLocalModel(Filter):
    """Cross-site evaluation gets no local model from this site: ``submit_model`` is answered without one."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if _task(fl_ctx) != AppConstants.TASK_SUBMIT_MODEL:
            return shareable
        site = fl_ctx.get_identity_name(default="?")
        self.log_info(fl_ctx, tagged_line(PROGRESS_TAG, kind="info", site=site, note="local model kept at the site"))
        return make_reply(ReturnCode.MODEL_UNRECOGNIZED)
