"""HE cross-site evaluation that works on NVFlare 2.9.

NVFlare 2.9's ``HECrossSiteModelEval`` overrides ``_save_validation_content``, which the 2.9 base class no
longer calls (it saves through ``_save_dxo_content``). Models therefore reach disk and the broadcast with live
TenSEAL vectors bound to the server's public context, which cannot be copied per target, and the workflow ends
with empty results while the job reports COMPLETED. Here every model is serialized to bytes before it is saved
and again after it is loaded, so what is broadcast is plain ciphertext bytes (the server still never decrypts).
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.he.cross_site_model_eval import HECrossSiteModelEval
from nvflare.app_opt.he.homomorphic_encrypt import serialize_nested_dict

from spleen_flare.workflows import HonoursTaskCheckPeriod


class SerializingHECrossSiteModelEval(HonoursTaskCheckPeriod, HECrossSiteModelEval):
    """``HECrossSiteModelEval`` that serializes CKKS vectors before saving and broadcasting."""

    def _save_dxo_content(self, name: str, save_dir: str, dxo: DXO, fl_ctx: FLContext) -> str:
        if isinstance(dxo.data, dict):
            serialize_nested_dict(dxo.data)
        return super()._save_dxo_content(name, save_dir, dxo, fl_ctx)

    def _load_validation_content(self, name: str, load_dir: str, fl_ctx: FLContext) -> DXO | None:
        dxo = super()._load_validation_content(name, load_dir, fl_ctx)
        if dxo is not None and isinstance(dxo.data, dict):
            serialize_nested_dict(dxo.data)
        return dxo
