"""The server's sum (``PackedSum``) refuses every malformed field of a packed update, and changes nothing then.

The server cannot decrypt, so whatever it lets in only shows up as garbage at every site one round later: each case
below must be refused with a ValueError, leave ``result()`` byte for byte as it was, and leave the sum able to
take the intact update afterwards (a refused update's seeds are not remembered either). Fields the server can
check against its own context are refused on an empty sum too. Real TenSEAL, contexts from ``conftest.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import pytest

from spleen_flare.he.packing import PackedSum, ct_key, encrypt_model

MODEL = {
    "conv.weight": np.random.default_rng(1).normal(0, 0.2, (32, 16, 3, 3, 3)).astype(np.float32),  # 2 ciphertexts
    "bn.num_batches_tracked": np.asarray(7, dtype=np.int64),
}
NBT = "bn.num_batches_tracked"
C0_BYTES = 8 * 8192  # one 60-bit prime at the lowest level


@pytest.fixture(scope="module")
def two_updates(contexts, key) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    return tuple(encrypt_model(MODEL, contexts[0], w, key=key) for w in (1.0, 2.0))


def _set(path: str, value) -> Callable:
    def mutate(data: dict, meta: dict) -> None:
        *parents, leaf = path.split(".")
        target = meta
        for part in parents:
            target = target[part]
        target[leaf] = value

    return mutate


def _contributions_zero(data: dict, meta: dict) -> None:
    meta["contributions"] = 0
    for k in range(meta["chunks"]):
        data[ct_key(k)] = data[ct_key(k)][:C0_BYTES]  # a blob that fits zero contributions: only c0


def _extra_chunk(data: dict, meta: dict) -> None:
    data[ct_key(meta["chunks"])] = data[ct_key(0)]
    meta["chunks"] += 1


def _seed_of_ct0_in_ct1(data: dict, meta: dict) -> None:
    data[ct_key(1)] = data[ct_key(1)][:C0_BYTES] + data[ct_key(0)][C0_BYTES:]


def _other_plain(data: dict, meta: dict) -> None:
    meta["plain"].append(["bn.step", [], "int64"])
    data["bn.step"] = np.array([1.0])


def _with(name: str, value) -> Callable:
    def mutate(data: dict, meta: dict) -> None:
        data[name] = value

    return mutate


def _without(name: str) -> Callable:
    return lambda data, meta: data.pop(name)


def _offset(data: dict, meta: dict) -> None:
    meta["tensors"][0][3] = 5


# (id, mutation, error pattern, refused on an empty sum too)
CASES = [
    ("weight-nan", _set("weight", math.nan), "weight", True),
    ("weight-negative", _set("weight", -1.0), "weight", True),
    ("weight-zero", _set("weight", 0.0), "weight", True),
    ("weight-inf", _set("weight", math.inf), "weight", True),
    ("weight-bool", _set("weight", True), "weight", True),
    ("weight-str", _set("weight", "1"), "weight", True),
    ("weight-past-max", _set("weight", 1.7e308), "weight", True),  # two such summed to inf
    ("weight-int-past-float", _set("weight", 10**400), "weight", True),  # was an OverflowError
    ("max-clients-past-cap", _set("max_clients", 10**6), "max_clients", True),
    ("contributions-zero", _contributions_zero, "contributions", True),
    ("contributions-bool", _set("contributions", True), "contributions", True),
    ("max-clients-zero", _set("max_clients", 0), "max_clients", True),
    ("max-clients-differs", _set("max_clients", 4), "max_clients", False),
    ("degree", _set("ciphertext.degree", 4096), "other CKKS parameters .*degree", True),
    ("moduli", _set("ciphertext.moduli", 2), "other CKKS parameters .*moduli", True),
    ("parms-id", _set("ciphertext.parms_id", "00" * 32), "other CKKS parameters .*parms_id", True),
    ("scale", _set("ciphertext.scale", 2.0**30), "other CKKS parameters .*scale", True),
    ("ntt", _set("ciphertext.ntt", 0), "other CKKS parameters .*ntt", True),
    ("slots", _set("slots", 2048), "slots", True),
    ("chunks", _extra_chunk, "ciphertexts for", True),
    ("n-values", _set("n_values", 13823), "n_values", True),
    ("tensor-offset", _offset, "layout", True),
    ("tensor-dtype-spec", lambda d, m: m["tensors"][0].__setitem__(2, "(99999999,)f8"), "layout", True),
    ("tensors-not-a-list", _set("tensors", "x" * 10**6), "tensors", True),
    ("version", _set("version", 3), "format version", True),
    ("extra-meta-field", _set("note", "x"), "unexpected fields", True),
    ("no-key", _set("key", None), "another HE key", True),
    ("other-key", _set("key", "ab" * 32), "another HE key", True),
    ("duplicate-seed-in-update", _seed_of_ct0_in_ct1, "repeats a seed", True),
    ("short-blob", lambda d, m: d.update({ct_key(1): d[ct_key(1)][:-1]}), "blob", True),
    ("str-blob", lambda d, m: d.update({ct_key(1): "x" * len(d[ct_key(1)])}), "blob", True),
    ("c0-above-q", lambda d, m: d.update({ct_key(1): b"\xff" * 8 + d[ct_key(1)][8:]}), "modulus", True),
    ("seed-not-seal", lambda d, m: d.update({ct_key(1): d[ct_key(1)][:-81] + bytes(81)}), "seed record", True),
    ("plain-shape", _with(NBT, np.zeros(16)), "shape", True),
    ("plain-nan", _with(NBT, np.array([math.nan])), "NaN", True),
    ("plain-bytes", _with(NBT, b"\x00" * 8), "shape", True),
    ("plain-other-name", _other_plain, "bn.step", True),
    ("plain-float-dtype", _set("plain", [[NBT, [], "float32"]]), "unencrypted", True),
    ("extra-key", _with("extra", b"x"), "unexpected", True),
    ("missing-blob", _without(ct_key(1)), "missing", True),
    ("missing-plain", _without(NBT), "missing", True),
]


def _state(total: PackedSum) -> tuple:
    data, meta = total.result()
    return repr(meta), sorted((k, v if isinstance(v, bytes) else v.tobytes()) for k, v in data.items())


@pytest.mark.parametrize(("mutate", "error", "on_empty"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_update_is_refused_and_the_sum_unchanged(contexts, key, two_updates, mutate, error, on_empty):
    first, second = two_updates
    data, meta = copy.deepcopy(second)
    mutate(data, meta)
    total = PackedSum(contexts[1], key)
    total.add(*copy.deepcopy(first))
    before = _state(total)
    with pytest.raises(ValueError, match=error):
        total.add(data, meta, sender="site-2")
    assert _state(total) == before
    total.add(*copy.deepcopy(second))  # the intact update still goes in: nothing of the refused one was kept
    assert total.count == 2
    if on_empty:  # checked against the server's own context, not only against the first update
        empty = PackedSum(contexts[1], key)
        with pytest.raises(ValueError, match=error):
            empty.add(*copy.deepcopy((data, meta)))
        assert empty.count == 0 and empty.meta is None


def test_replayed_update_is_refused(contexts, key, two_updates) -> None:
    first, _ = two_updates
    total = PackedSum(contexts[1], key)
    total.add(*copy.deepcopy(first))
    before = _state(total)
    with pytest.raises(ValueError, match="repeats a seed"):
        total.add(*copy.deepcopy(first))
    assert _state(total) == before


def test_no_more_contributions_than_max_clients(contexts, key) -> None:
    """Past max_clients the sites' range check no longer holds and values would wrap silently."""
    client_ctx, server_ctx = contexts
    total = PackedSum(server_ctx, key)
    for w in (1.0, 2.0):
        total.add(*encrypt_model(MODEL, client_ctx, w, max_clients=2, key=key))
    before = _state(total)
    with pytest.raises(ValueError, match="3 contributions, more than the max_clients 2"):
        total.add(*encrypt_model(MODEL, client_ctx, 3.0, max_clients=2, key=key), sender="site-3")
    assert _state(total) == before
    # an aggregate of two added to one update: 3 > 2 as well
    single = PackedSum(server_ctx, key)
    single.add(*encrypt_model(MODEL, client_ctx, 1.0, max_clients=2, key=key))
    with pytest.raises(ValueError, match="max_clients 2"):
        single.add(*total.result())
    assert single.count == 1


def test_encrypt_model_sends_only_batchnorm_counters_in_clear(contexts, key) -> None:
    weights = {"w": np.ones(10, dtype=np.float32)}
    with pytest.raises(ValueError, match="'step' \\(int64\\) would travel unencrypted"):
        encrypt_model({**weights, "step": np.arange(3)}, contexts[0], 1.0, key=key)
    with pytest.raises(ValueError, match="'bn.num_batches_tracked' \\(bool\\)"):
        encrypt_model({**weights, NBT: np.asarray(True)}, contexts[0], 1.0, key=key)
    data, meta = encrypt_model({**weights, NBT: np.asarray(3)}, contexts[0], 1.0, key=key)
    assert [p[0] for p in meta["plain"]] == [NBT] and set(data) == {ct_key(0), NBT}


@pytest.mark.parametrize("weight", [math.nan, -1.0, math.inf, 0, True])
def test_encrypt_model_refuses_bad_weights(contexts, key, weight) -> None:
    with pytest.raises(ValueError, match="weight"):
        encrypt_model(MODEL, contexts[0], weight, key=key)


def test_encrypt_model_needs_a_key_fingerprint(contexts) -> None:
    with pytest.raises(ValueError, match="not an HE key fingerprint"):
        encrypt_model(MODEL, contexts[0], 1.0, key="not-hex")
