"""Server-side persistor for the HE job: stores the encrypted global model as it is, ciphertext bytes.

After the first HE round the global model is a packed CKKS aggregate (ciphertext bytes, plaintext integer
buffers, layout and total weight in the metadata; see ``spleen_flare.he.packing``), which NVFlare's PyTorch
persistor cannot load into the network. This one never decrypts (the server has no secret key): it writes the
model as an NVFlare DXO file (FOBS, like cross-site evaluation's model files) at the usual checkpoint paths and
serves it back to the model locator for cross-site evaluation, so that the sites decrypt it themselves. The
metadata is kept whole, key fingerprint included, so that a site of another provisioning refuses a stored model
instead of decrypting it to garbage. The initial (plaintext) model is handled by the usual PyTorch checkpoint code.
"""

from __future__ import annotations

import hashlib
import os

from nvflare.apis.dxo import from_file
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import (
    ModelLearnable,
    ModelLearnableKey,
    make_model_learnable,
    model_learnable_to_dxo,
)
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from spleen_flare.contract import HE_TAG, tagged_line
from spleen_flare.he.packing import HE_META_KEY, is_packed
from spleen_flare.persistor import BundleModelPersistor


def packed_digest(weights: dict) -> str:
    """sha256 over the sorted entries' bytes (ciphertexts as they are)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        value = weights[name]
        digest.update(name.encode())
        digest.update(value if isinstance(value, bytes) else memoryview(value).tobytes())
    return digest.hexdigest()


class HEBundleModelPersistor(BundleModelPersistor):
    """``BundleModelPersistor`` that keeps encrypted global models encrypted on disk."""

    _latest: ModelLearnable | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        numpy_decomposers.register()  # the DXO files hold numpy arrays (plaintext integer buffers)

    @staticmethod
    def _is_packed(ml: ModelLearnable | None) -> bool:
        return isinstance(ml, dict) and is_packed(ml.get(ModelLearnableKey.META))

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        if not self._is_packed(ml):
            self._latest = None
            super().save_model(ml, fl_ctx)  # plaintext (initial) model: the usual checkpoint
            return
        self._latest = ml
        weights = ml[ModelLearnableKey.WEIGHTS]
        self._record_packed(weights, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))  # before the file (see resume)
        self.save_model_file(self._ckpt_save_path)
        he_meta = ml[ModelLearnableKey.META][HE_META_KEY]
        self.logger.info(
            tagged_line(
                HE_TAG,
                side="server",
                stage="persist",
                ciphertexts=he_meta["chunks"],
                contributions=he_meta["contributions"],
                path=str(self._ckpt_save_path),
            )
        )

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            ml = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if self._is_packed(ml):
                self._write_packed(ml, self._best_ckpt_save_path)
                self.record_best(packed_digest(ml[ModelLearnableKey.WEIGHTS]), fl_ctx)
                return
        super().handle_event(event, fl_ctx)

    def model_digest(self, ml: ModelLearnable) -> str:
        return packed_digest(ml[ModelLearnableKey.WEIGHTS]) if self._is_packed(ml) else super().model_digest(ml)

    def adopt(self, model_path, fl_ctx: FLContext) -> ModelLearnable:
        """An encrypted checkpoint stays as it is (the plaintext initial model still sets up NVFlare's format)."""
        stored = self._get_model_from_location(str(model_path), fl_ctx)
        if not self._is_packed(stored):
            return super().adopt(model_path, fl_ctx)
        PTFileModelPersistor.load_model(self, fl_ctx)
        self._latest = stored
        return stored

    def save_model_file(self, save_path: str) -> None:
        if self._latest is None:
            super().save_model_file(save_path)
        else:
            self._write_packed(self._latest, save_path)

    @staticmethod
    def _write_packed(ml: ModelLearnable, save_path: str) -> None:
        tmp = f"{save_path}.tmp"
        model_learnable_to_dxo(ml).to_file(tmp)
        os.replace(tmp, save_path)

    def _record_packed(self, weights: dict, round_label) -> None:
        self.append_history({"round": round_label, "sha256": packed_digest(weights), "encrypted": True})

    def _get_model_from_location(self, location, fl_ctx: FLContext):
        try:
            dxo = from_file(location)
        except Exception:  # not a DXO file: a plaintext PyTorch checkpoint
            return super()._get_model_from_location(location, fl_ctx)
        return make_model_learnable(dxo.data, dict(dxo.meta or {}))
