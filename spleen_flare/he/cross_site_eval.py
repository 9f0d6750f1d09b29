"""HE cross-site evaluation that works on NVFlare 2.9.

NVFlare 2.9's ``HECrossSiteModelEval`` overrides ``_save_validation_content``, which the 2.9 base class no
longer calls (it saves through ``_save_dxo_content``). Models therefore reach disk and the broadcast with live
TenSEAL vectors bound to the server's public context, which cannot be copied per target, and the workflow ends
with empty results while the job reports COMPLETED. Here every model is serialized to bytes before it is saved
and again after it is loaded, so what is broadcast is plain ciphertext bytes (the server still never decrypts).

A site's packed model is checked as the aggregator checks an update (``PackedSum``: sizes first, then every field
against the server's context) before it is saved and broadcast: a malformed one would otherwise reach every site.
It is refused with one log line and the other sites' models go on.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.he.cross_site_model_eval import HECrossSiteModelEval
from nvflare.app_opt.he.homomorphic_encrypt import serialize_nested_dict

from spleen_flare.he.keys import key_fingerprint
from spleen_flare.he.packing import HE_META_KEY, PackedSum
from spleen_flare.he.validation import brief, short_message
from spleen_flare.workflows import HonoursTaskCheckPeriod, LeavesOutDroppedSites


class SerializingHECrossSiteModelEval(LeavesOutDroppedSites, HonoursTaskCheckPeriod, HECrossSiteModelEval):
    """``HECrossSiteModelEval`` that serializes CKKS vectors before saving and broadcasting, and refuses malformed
    packed site models."""

    _key_fingerprint: str | None = None

    def _save_dxo_content(self, name: str, save_dir: str, dxo: DXO, fl_ctx: FLContext) -> str:
        if isinstance(dxo.data, dict):
            serialize_nested_dict(dxo.data)
        return super()._save_dxo_content(name, save_dir, dxo, fl_ctx)

    def _load_validation_content(self, name: str, load_dir: str, fl_ctx: FLContext) -> DXO | None:
        dxo = super()._load_validation_content(name, load_dir, fl_ctx)
        if dxo is not None and isinstance(dxo.data, dict):
            serialize_nested_dict(dxo.data)
        return dxo

    def _save_client_model(self, model_name: str, dxo: DXO, fl_ctx: FLContext) -> None:
        try:
            self.check_site_model(model_name, dxo)
        except Exception as err:  # whatever it is, it is this site's model that is refused
            self.log_error(fl_ctx, f"refused {model_name}'s model for cross-site validation: {short_message(err)}")
            return
        super()._save_client_model(model_name, dxo, fl_ctx)

    def check_site_model(self, model_name: str, dxo: DXO) -> None:
        """A packed site model is one well-formed contribution under the server's key (ValueError if not)."""
        he_meta = (dxo.meta or {}).get(HE_META_KEY)
        if he_meta is None:
            return  # a plaintext model: the site's own choice, and the sites' decryptor passes it through
        if not isinstance(he_meta, dict) or type(he_meta.get("contributions")) is not int:
            raise ValueError("packed HE metadata without a contribution count")
        if he_meta["contributions"] != 1:
            raise ValueError(f"it claims {brief(he_meta['contributions'])} contributions, a site sends 1")
        if self._key_fingerprint is None:
            self._key_fingerprint = key_fingerprint(self.tenseal_context)
        PackedSum(self.tenseal_context, self._key_fingerprint).add(dxo.data, he_meta, sender=model_name)
