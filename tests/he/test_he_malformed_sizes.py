"""One malformed HE update costs its reader no more than its own bytes, and never the round.

The attacks a security review found (figures of the code before the fix): a consistent layout declaring 4,000,000
ciphertexts cost 5.4 s and 550 MB before its refusal, whose message alone was 16 MB at 1,000,000; 400,000 empty
blobs made numpy ask for 24 GiB and the MemoryError escaped the aggregator's ``accept``, failing the round; a shape
of 1,000,000 entries was multiplied out under the aggregator's lock; two weights of 1.7e308 summed to inf, after
which every site refused the model. Each is refused here before anything is built from what it declares, at the
server and at a site (which decrypts what the server sends, and what cross-site evaluation relays). Memory is
measured with tracemalloc (numpy reports its buffers to it), never time: the figures come from
``benchmarks/he_malformed_update.py``. Real TenSEAL and NVFlare objects, contexts from ``conftest.py``.
"""

from __future__ import annotations

import copy
import logging
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from he.conftest import server_aggregator
from spleen_flare.he.aggregator import PackedHEAggregator, model_values
from spleen_flare.he.cross_site_eval import SerializingHECrossSiteModelEval
from spleen_flare.he.filters import PackedHEDecryptor
from spleen_flare.he.packing import HE_META_KEY, PackedSum, ct_key, decrypt_model, encrypt_model
from spleen_flare.he.validation import MAX_CLIENTS, MAX_MESSAGE_CHARS, MAX_WEIGHT

MODEL = {
    "conv.weight": np.random.default_rng(2).normal(0, 0.2, (32, 16, 3, 3, 3)).astype(np.float32),  # 2 ciphertexts
    "bn.num_batches_tracked": np.asarray(7, dtype=np.int64),
}
NBT = "bn.num_batches_tracked"
MiB = 2**20


@pytest.fixture(scope="module")
def update(contexts, key) -> tuple[dict, dict]:
    return encrypt_model(MODEL, contexts[0], 3.0, key=key)


def _declaring(meta: dict, chunks: int) -> dict:
    """``meta`` with a consistent layout of ``chunks`` ciphertexts: one float tensor filling them all."""
    meta = copy.deepcopy(meta)
    n_values = chunks * 2 * meta["slots"]
    meta.update(n_values=n_values, chunks=chunks, tensors=[["w", [n_values], "float32", 0]])
    return meta


def _measured(call: Callable[[], Any]) -> tuple[Any, int]:
    """(what ``call`` returned, or the exception it raised; the peak of traced memory meanwhile)."""
    tracemalloc.start()
    try:
        outcome = call()
    except Exception as err:  # the outcome under test
        outcome = err
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return outcome, peak


def _arrived(data: dict, meta: dict, site: str, rnd: int = 0) -> Shareable:
    """A packed update as the server's aggregator receives it from ``site``."""
    sh = DXO(DataKind.WEIGHTS, data, {HE_META_KEY: meta}).to_shareable()
    sh.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    sh.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    return sh


def _site_gets(contexts, key, data: dict, meta: dict) -> Any:
    """What a site's decryptor (the task data filter) does with a packed model from the server."""
    dec = PackedHEDecryptor()
    dec.tenseal_context, dec.key_fingerprint = contexts[0], key
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    fl_ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
    task = DXO(DataKind.WEIGHTS, data, {HE_META_KEY: meta}).to_shareable()
    return _measured(lambda: dec.process(task, fl_ctx))


def _errors_about(caplog, site: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and site in r.getMessage()]


def _one_short_line(records: list[logging.LogRecord]) -> str:
    assert len(records) == 1, [r.getMessage()[:200] for r in records]
    message = records[0].getMessage()
    assert records[0].exc_info is None and "\n" not in message  # one line: no traceback
    assert len(message) <= MAX_MESSAGE_CHARS + 200, len(message)  # the reason, plus NVFlare's context prefix
    return message


def _assert_the_round_goes_on(agg: PackedHEAggregator, fl_ctx: FLContext, contexts, key, weight: float) -> None:
    """The aggregate holds the accepted update(s) only, and a site decrypts it to the model."""
    aggregate = from_shareable(agg.aggregate(fl_ctx))
    he_meta = aggregate.meta[HE_META_KEY]
    assert he_meta["weight"] == weight and np.isfinite(he_meta["weight"])
    got = decrypt_model(aggregate.data, he_meta, contexts[0], key=key)
    np.testing.assert_allclose(got["conv.weight"], MODEL["conv.weight"], rtol=1e-6, atol=1e-6)
    assert got[NBT] == MODEL[NBT]


def test_a_four_million_ciphertext_layout_is_refused_before_anything_is_built(contexts, key, update) -> None:
    data, meta = copy.deepcopy(update)
    huge = _declaring(meta, 4_000_000)  # consistent: 32.8e9 values, 256 GiB of ciphertexts declared
    total = PackedSum(contexts[1], key)
    refusal, peak = _measured(lambda: total.add(data, huge, sender="site-2"))
    assert isinstance(refusal, ValueError) and "values" in str(refusal), refusal
    assert len(str(refusal)) <= MAX_MESSAGE_CHARS, len(str(refusal))
    assert peak < 1 * MiB, peak  # not one name, blob or array per declared ciphertext
    assert total.count == 0
    total.add(*copy.deepcopy(update))  # the sum still takes an intact update
    # a site, given the same layout by a malicious server, refuses it as cheaply
    refusal, peak = _site_gets(contexts, key, data, huge)
    assert isinstance(refusal, ValueError) and "values" in str(refusal), refusal
    assert len(str(refusal)) <= MAX_MESSAGE_CHARS and peak < 1 * MiB, (len(str(refusal)), peak)


def test_four_hundred_thousand_empty_blobs_are_refused_and_the_round_goes_on(contexts, key, caplog) -> None:
    client_ctx, server_ctx = contexts
    agg, fl_ctx = server_aggregator(server_ctx)
    data, meta = encrypt_model(MODEL, client_ctx, 5.0, key=key)
    empty = {ct_key(k): b"" for k in range(400_000)} | {NBT: data[NBT]}
    malformed = _arrived(empty, _declaring(meta, 400_000), "site-2")  # numpy was asked for 24 GiB before the fix
    caplog.set_level(logging.ERROR)
    # the first update of the round: no earlier layout to compare it with
    accepted, peak = _measured(lambda: agg.accept(malformed, fl_ctx))
    assert accepted is False, accepted  # refused, not raised: NVFlare would fail the round's task
    assert peak < 4 * MiB, peak
    assert "site-2" in _one_short_line(_errors_about(caplog, "site-2"))
    assert agg.accept(_arrived(*encrypt_model(MODEL, client_ctx, 3.0, key=key), "site-1"), fl_ctx)
    _assert_the_round_goes_on(agg, fl_ctx, contexts, key, weight=3.0)
    # a site given such a model refuses it before decrypting anything
    refusal, peak = _site_gets(contexts, key, empty, _declaring(meta, 400_000))
    assert isinstance(refusal, ValueError) and peak < 4 * MiB, (refusal, peak)


def test_a_million_entry_shape_is_refused_with_a_short_message(contexts, key, update) -> None:
    data, meta = copy.deepcopy(update)
    name, shape, dtype, offset = meta["tensors"][0]
    # the same number of values, so that the layout adds up: only the number of dimensions is wrong
    meta["tensors"][0] = [name, [1] * (1_000_000 - len(shape)) + shape, dtype, offset]
    total = PackedSum(contexts[1], key)
    refusal, peak = _measured(lambda: total.add(data, meta, sender="site-2"))
    assert isinstance(refusal, ValueError) and "dimensions" in str(refusal), refusal
    assert len(str(refusal)) <= MAX_MESSAGE_CHARS and peak < 1 * MiB, (len(str(refusal)), peak)
    assert total.count == 0
    refusal, _ = _site_gets(contexts, key, data, meta)
    assert isinstance(refusal, ValueError) and "dimensions" in str(refusal), refusal


def test_weights_whose_sum_would_not_be_finite_are_refused(contexts, key, caplog) -> None:
    client_ctx, server_ctx = contexts
    agg, fl_ctx = server_aggregator(server_ctx)
    caplog.set_level(logging.ERROR)
    for site in ("site-1", "site-2"):  # each finite; their sum was inf, which every site then refused
        data, meta = encrypt_model(MODEL, client_ctx, 1.0, key=key)
        meta["weight"] = 1.7e308
        assert not agg.accept(_arrived(data, meta, site), fl_ctx), site
        assert "weight" in _one_short_line(_errors_about(caplog, site))
    assert agg.accept(_arrived(*encrypt_model(MODEL, client_ctx, 3.0, key=key), "site-3"), fl_ctx)
    _assert_the_round_goes_on(agg, fl_ctx, contexts, key, weight=3.0)
    # the largest weight a contribution may carry keeps a sum of max_clients of them finite
    total = PackedSum(server_ctx, key)
    for _ in range(2):
        data, meta = encrypt_model(MODEL, client_ctx, 1.0, key=key)
        meta["weight"] = MAX_WEIGHT
        total.add(data, meta)
    assert total.result()[1]["weight"] == 2 * MAX_WEIGHT
    with pytest.raises(ValueError, match="weight_scale"):  # a site is told at once, not the server one round later
        encrypt_model(MODEL, client_ctx, 2 * MAX_WEIGHT, key=key)


@pytest.mark.parametrize("error", [RuntimeError, MemoryError, OverflowError, RecursionError, KeyError])
def test_any_exception_inside_accept_refuses_that_update_only(contexts, key, caplog, error) -> None:
    """Whatever no check foresees (here raised by a blob whose length cannot be taken) refuses that one update."""

    class Unforeseen(bytes):
        def __len__(self) -> int:
            raise error("no check foresees this")

    client_ctx, server_ctx = contexts
    agg, fl_ctx = server_aggregator(server_ctx)
    assert agg.accept(_arrived(*encrypt_model(MODEL, client_ctx, 3.0, key=key), "site-1"), fl_ctx)
    data, meta = encrypt_model(MODEL, client_ctx, 5.0, key=key)
    data[ct_key(1)] = Unforeseen(data[ct_key(1)])
    caplog.set_level(logging.ERROR)
    accepted, _ = _measured(lambda: agg.accept(_arrived(data, meta, "site-2"), fl_ctx))
    assert accepted is False, accepted
    assert error.__name__ in _one_short_line(_errors_about(caplog, "site-2"))
    _assert_the_round_goes_on(agg, fl_ctx, contexts, key, weight=3.0)


def test_an_update_larger_than_the_global_model_is_refused(contexts, key, caplog) -> None:
    client_ctx, server_ctx = contexts
    agg, fl_ctx = server_aggregator(server_ctx)
    # the round's global model, as ScatterAndGather sets it: here the plaintext initial model
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(dict(MODEL), {}), private=True, sticky=False)
    assert model_values(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)) == MODEL["conv.weight"].size
    bigger = {**MODEL, "extra.weight": np.ones(3 * 8192, dtype=np.float32)}  # consistent, 3 more ciphertexts
    caplog.set_level(logging.ERROR)
    assert not agg.accept(_arrived(*encrypt_model(bigger, client_ctx, 5.0, key=key), "site-2"), fl_ctx)
    assert "the global model" in _one_short_line(_errors_about(caplog, "site-2"))
    assert agg.accept(_arrived(*encrypt_model(MODEL, client_ctx, 3.0, key=key), "site-1"), fl_ctx)
    # from round 1 on the global model is the packed aggregate: its layout says how many values it holds
    aggregate = from_shareable(agg.aggregate(fl_ctx))
    packed_model = make_model_learnable(aggregate.data, dict(aggregate.meta))
    assert model_values(packed_model) == MODEL["conv.weight"].size


def test_a_site_refuses_more_contributions_than_any_max_clients_before_decrypting(contexts, key, update) -> None:
    """A site adds one seed expansion per contribution: a count past MAX_CLIENTS is refused before the first."""
    data, meta = copy.deepcopy(update)
    n = MAX_CLIENTS + 1
    c0_bytes = 8 * meta["ciphertext"]["degree"] * meta["ciphertext"]["moduli"]
    data = {name: (v[:c0_bytes] + v[c0_bytes:] * n if isinstance(v, bytes) else v * n) for name, v in data.items()}
    meta.update(contributions=n, max_clients=n, weight=3.0 * n)
    refusal, _ = _site_gets(contexts, key, data, meta)
    assert isinstance(refusal, ValueError) and "max_clients" in str(refusal), refusal


def test_cross_site_evaluation_refuses_a_malformed_site_model_before_it_reaches_the_sites(
    contexts, key, update, caplog, tmp_path
) -> None:
    evaluation = SerializingHECrossSiteModelEval()
    evaluation.tenseal_context = contexts[1]  # what start_controller loads from the server's kit
    evaluation._cross_val_models_dir = str(tmp_path)
    data, meta = copy.deepcopy(update)
    evaluation.check_site_model("site-1", DXO(DataKind.WEIGHTS, data, {HE_META_KEY: meta}))  # intact: passes
    empty = {ct_key(k): b"" for k in range(400_000)} | {NBT: data[NBT]}
    malformed = DXO(DataKind.WEIGHTS, empty, {HE_META_KEY: _declaring(meta, 400_000)})
    caplog.set_level(logging.ERROR)
    outcome, peak = _measured(lambda: evaluation._save_client_model("site-2", malformed, FLContext()))
    assert outcome is None and peak < 4 * MiB, (outcome, peak)
    assert "cross-site" in _one_short_line(_errors_about(caplog, "site-2"))
    assert "site-2" not in evaluation._client_models and not list(tmp_path.iterdir())  # neither saved nor sent
