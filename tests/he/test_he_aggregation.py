"""HE FedAvg equals plaintext FedAvg: NVFlare's HE encryptor, in-time aggregator and decryptor, fixed weights.

No processes, no training: a TenSEAL context with the provisioning's CKKS parameters is made here.
"""

from __future__ import annotations

import numpy as np
import pytest

ts = pytest.importorskip("tenseal")

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable  # noqa: E402
from nvflare.apis.fl_constant import ReservedKey  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402
from nvflare.app_common.app_constant import AppConstants  # noqa: E402
from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator  # noqa: E402
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor  # noqa: E402
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor  # noqa: E402

SHAPES = {"conv.weight": (4, 1, 3, 3, 3), "conv.bias": (4,), "bn.running_mean": (4,)}


def _context() -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2**40
    ctx.generate_galois_keys()
    return ctx


def _encrypt(ctx: ts.Context, diff: dict, n_steps: int) -> DXO:
    enc = HEModelEncryptor(weigh_by_local_iter=True)
    enc.tenseal_context = ctx
    enc.n_iter = n_steps
    enc.encrypt_layers = [True]  # what START_RUN sets when no layer list is configured
    dxo = DXO(
        DataKind.WEIGHT_DIFF, {k: v.copy() for k, v in diff.items()}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: n_steps}
    )
    return enc._process(dxo, FLContext())


def test_he_fedavg_matches_plain_fedavg() -> None:
    ctx = _context()
    public = ctx.copy()
    public.make_context_public()
    rng = np.random.default_rng(0)
    updates = {
        "site-1": ({k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}, 3),
        "site-2": ({k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}, 5),
    }
    agg = HEInTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF)
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    agg._initialize(agg.aggregation_weights, agg.exclude_vars, agg.expected_data_kind)  # what START_RUN does
    for site, (diff, steps) in updates.items():
        sh = _encrypt(ctx, diff, steps).to_shareable()
        sh.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        sh.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
        assert agg.accept(sh, fl_ctx)
    result = from_shareable(agg.aggregate(fl_ctx))
    # the server's aggregate is ciphertext only
    for name in SHAPES:
        assert isinstance(result.data[name], ts.CKKSVector), name
        with pytest.raises(ValueError):  # no secret key on the server side
            ts.ckks_vector_from(public, result.data[name].serialize()).decrypt()

    dec = HEModelDecryptor()
    dec.tenseal_context = ctx
    plain = dec.decryption(dict(result.data), result.get_meta_prop(MetaKey.PROCESSED_KEYS), FLContext())
    total = sum(s for _, s in updates.values())
    for name, shape in SHAPES.items():
        expected = sum(d[name].astype(np.float64) * s for d, s in updates.values()) / total
        got = np.asarray(plain[name]).reshape(shape)
        np.testing.assert_allclose(got, expected, atol=1e-5)
