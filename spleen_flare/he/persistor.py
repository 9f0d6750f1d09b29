"""Server-side persistor for the HE job: stores the encrypted global model as ciphertext bytes.

After the first HE round the global model holds CKKS ciphertexts (bytes), which the plain PyTorch persistor
tries to load into the network and refuses (shape mismatch). This one never decrypts (the server has no secret
key): it pickles the learnable as it is, ciphertext bytes plus CKKS metadata, and serves it back to the model
locator for cross-site evaluation so that clients decrypt it themselves.
"""

from __future__ import annotations

import os
import pickle

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_opt.he.homomorphic_encrypt import serialize_nested_dict

from spleen_flare.persistor import BundleModelPersistor


class HEBundleModelPersistor(BundleModelPersistor):
    """``BundleModelPersistor`` that keeps encrypted global models encrypted on disk."""

    _latest: ModelLearnable | None = None

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        weights = ml.get(ModelLearnableKey.WEIGHTS) or {}
        if not any(isinstance(v, bytes) or type(v).__name__ == "CKKSVector" for v in weights.values()):
            super().save_model(ml, fl_ctx)  # plaintext (initial) model: the usual checkpoint
            return
        serialize_nested_dict(weights)
        self._latest = ml
        self.save_model_file(self._ckpt_save_path)
        print(
            f"[spleen-he] side=server stage=persist encrypted_tensors="
            f"{sum(isinstance(v, bytes) for v in weights.values())} path={self._ckpt_save_path}",
            flush=True,
        )

    def save_model_file(self, save_path: str) -> None:
        if self._latest is None:
            super().save_model_file(save_path)
            return
        tmp = save_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(
                {
                    "weights": dict(self._latest[ModelLearnableKey.WEIGHTS]),
                    "meta": dict(self._latest.get(ModelLearnableKey.META) or {}),
                },
                f,
            )
        os.replace(tmp, save_path)

    def _get_model_from_location(self, location, fl_ctx: FLContext):
        try:
            with open(location, "rb") as f:
                data = pickle.load(f)
            if isinstance(data, dict) and set(data) == {"weights", "meta"}:
                return make_model_learnable(data["weights"], data["meta"])
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError):
            pass
        return super()._get_model_from_location(location, fl_ctx)
