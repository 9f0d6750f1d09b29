"""Checks on a packed HE model's metadata, blobs' parameters and plaintext buffers, before anything uses them.

The design and the reasons for it: docs/design.md, "spleen_flare/he/validation.py".
"""

from __future__ import annotations

import itertools
import math
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tenseal as ts

from spleen_flare.he.keys import _FIX_KEY
from spleen_flare.he.seal_format import _parms_id_hex, seal_version

FORMAT_VERSION = 4
PLAIN_SUFFIX = "num_batches_tracked"  # BatchNorm's step counter: the only tensor that may travel in clear
META_KEYS = frozenset(
    {"version", "slots", "packing", "n_values", "chunks", "tensors", "plain", "weight", "contributions"}
    | {"max_clients", "key", "level", "ciphertext"}
)
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
INT_DTYPES = frozenset({f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)})

# Absolute caps on what a packed model may declare; the server also bounds the values by its own global model.
MAX_VALUES = 2**26  # float values of one model: 67 M, 14x the full-size spleen UNet (4.8 M)
MAX_TENSORS = 4096  # tensors of one model (the UNet has 148)
MAX_NAME_CHARS = 256  # a tensor's name (the UNet's longest has 90)
MAX_DIMS = 32  # dimensions of one tensor (numpy 1's limit; the UNet's tensors have at most 5)
MAX_CLIENTS = 1024  # max_clients, hence contributions: a site decrypts by adding one seed expansion per contribution
MAX_WEIGHT = 1e12  # one contribution's weight: local steps x weight_scale (a billion steps at weight_scale 1000)
MAX_STEP_COUNT = 2**53  # a plaintext BatchNorm step counter (exact in float64), times the weight in a buffer
MAX_MESSAGE_CHARS = 300  # a refusal names what it refuses; it never echoes a value in full
_BRIEF = reprlib.Repr()  # keyword arguments only from Python 3.12
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxset = 2, 4, 4, 4, 4
_BRIEF.maxstring = _BRIEF.maxother = _BRIEF.maxlong = 40


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def brief(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut short (nesting, items and length), for an error about a value from another party."""
    if isinstance(value, Mapping | set | frozenset) and len(value) > 16:
        return f"<{type(value).__name__} of {len(value)} items>"  # reprlib would sort them all first
    try:
        text = _BRIEF.repr(value)
    except Exception:  # a repr that fails (an int past Python's digit limit) or is huge
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def brief_names(names: Iterable[Any], limit: int = 4) -> str:
    """A few of ``names`` (sorted among the first ones met), for an error: never the whole list."""
    some = sorted(map(brief, itertools.islice(names, 4 * limit)))
    return ", ".join(some[:limit]) + (", ..." if len(some) > limit else "")


def short_message(err: BaseException) -> str:
    """``str(err)`` (its type where empty, as a MemoryError's often is) cut to ``MAX_MESSAGE_CHARS``."""
    try:
        text = str(err) or type(err).__name__
    except Exception:
        text = type(err).__name__
    text = " ".join(text.split())  # one line
    return text if len(text) <= MAX_MESSAGE_CHARS else f"{text[: MAX_MESSAGE_CHARS - 3]}..."


def _positive_weight(weight: Any, what: str, limit: float = MAX_WEIGHT) -> float:
    """A real number > 0 and <= ``limit`` (bools, NaN, infinities and ints past a float are refused)."""
    real = isinstance(weight, int | float | np.integer | np.floating) and not isinstance(weight, bool)
    # compared before any conversion: NaN fails both comparisons, a huge int compares exactly instead of overflowing
    if not (real and 0 < weight <= limit):
        raise ValueError(
            f"{what} must be a number > 0 and at most {limit:g}, got {brief(weight)}: the weight is local steps x "
            "weight_scale (lower weight_scale in the HE encryptor args of config_fed_client.json)"
        )
    return float(weight)


def _bounded_int(value: Any, low: int, high: int) -> bool:
    return _is_int(value) and low <= value <= high


def _dtype_name(dtype: Any) -> str:
    """numpy's name of ``dtype`` (a dtype or a short string); "?" for anything else."""
    if not (isinstance(dtype, np.dtype) or (isinstance(dtype, str) and len(dtype) <= 16)):
        return "?"  # np.dtype() of a long spec builds it (a structured dtype of a million fields)
    try:
        return np.dtype(dtype).name
    except (TypeError, ValueError, SyntaxError):
        return "?"


def _dtype_label(dtype: Any) -> str:
    text = str(dtype) if isinstance(dtype, np.dtype | str) else brief(dtype)
    return text if len(text) <= 20 else brief(text)


def _is_name(name: Any) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_CHARS


def _check_plain_name(name: Any, dtype: Any) -> None:
    """Only BatchNorm's integer step counter may travel unencrypted."""
    if not (_is_name(name) and name.endswith(PLAIN_SUFFIX) and _dtype_name(dtype) in INT_DTYPES):
        raise ValueError(
            f"HE: tensor {brief(name)} ({_dtype_label(dtype)}) would travel unencrypted: only BatchNorm's integer "
            f"{PLAIN_SUFFIX} may; cast it to float or leave it out of the model"
        )


def _plain_shape(shape: Any) -> tuple[int, ...]:
    """The shape a plaintext buffer travels in: at least 1-d (a 0-d product is a numpy scalar)."""
    return tuple(shape) or (1,)


def _layout(meta: Mapping) -> tuple:
    return (meta["n_values"], meta["chunks"]) + tuple(map(str, (meta["tensors"], meta["plain"])))


def _check_format(he_meta: Any) -> None:
    version = he_meta.get("version") if isinstance(he_meta, Mapping) else None
    if version != FORMAT_VERSION or he_meta.get("packing") != "complex" or he_meta.get("level") != "lowest":
        raise ValueError(
            f"unknown packed HE format version {brief(version)} (this code reads {FORMAT_VERSION}): run the same "
            "spleen_flare on every participant"
        )
    if len(he_meta) != len(META_KEYS) or not all(isinstance(k, str) and k in META_KEYS for k in he_meta):
        odd = itertools.chain((k for k in he_meta if k not in META_KEYS), (k for k in META_KEYS if k not in he_meta))
        raise ValueError(
            f"packed HE metadata with missing or unexpected fields ({len(he_meta)} fields): {brief_names(odd)}"
        )


def check_max_clients(max_clients: Any, what: str) -> int:
    if not _bounded_int(max_clients, 1, MAX_CLIENTS):
        raise ValueError(f"{what}: max_clients must be an integer from 1 to {MAX_CLIENTS}, got {brief(max_clients)}")
    return int(max_clients)


def _check_counts(he_meta: Mapping) -> tuple[float, int, int]:
    """(weight, contributions, max_clients), each checked: more contributions than max_clients may have wrapped.

    The weight is at most ``MAX_WEIGHT`` per contribution, so that a sum of ``MAX_CLIENTS`` of them stays finite.
    """
    contributions = he_meta["contributions"]
    max_clients = check_max_clients(he_meta["max_clients"], "packed HE model")
    if not _bounded_int(contributions, 1, max_clients):
        raise ValueError(
            f"packed HE model: contributions must be an integer from 1 to max_clients {max_clients}, "
            f"got {brief(contributions)}"
        )
    weight = _positive_weight(he_meta["weight"], "packed HE model weight", MAX_WEIGHT * contributions)
    return weight, int(contributions), max_clients


def expected_ciphertext(ctx: ts.Context) -> dict:
    """The SEAL parameters every packed ciphertext under ``ctx`` must carry (lowest level, NTT form)."""
    last = ctx.seal_context().data.last_context_data()
    return {
        "parms_id": _parms_id_hex(last.parms_id()),
        "ntt": 1,
        "degree": last.parms().poly_modulus_degree(),
        "moduli": len(last.parms().coeff_modulus()),
        "scale": float(ctx.global_scale),
        "correction": 1,
        "seal_version": list(seal_version()),
    }


def _check_ciphertext(params: Any, expected: Mapping, whose: str) -> None:
    if not isinstance(params, Mapping) or set(params) != set(expected):
        raise ValueError("packed HE model without the SEAL parameters of its ciphertexts")
    for field, want in expected.items():
        got = list(params[field]) if isinstance(params[field], tuple) else params[field]
        if got != want or isinstance(got, bool):
            raise ValueError(
                f"packed HE model made with other CKKS parameters than {whose} context ({field} {brief(got)}, "
                f"expected {want!r}): {_FIX_KEY}"
            )


def _size(shape: Any, limit: int) -> int:
    """The number of values of ``shape``: at most ``MAX_DIMS`` dimensions of at most ``limit`` each."""
    if not (
        isinstance(shape, list | tuple) and len(shape) <= MAX_DIMS and all(_bounded_int(d, 0, limit) for d in shape)
    ):
        raise ValueError(
            f"packed HE model: {brief(shape)} is not a tensor shape (at most {MAX_DIMS} dimensions of at most "
            f"{limit} each)"
        )
    return math.prod(int(d) for d in shape)  # at most limit ** MAX_DIMS: a small integer still


def _entries(he_meta: Mapping, field: str, width: int) -> list:
    """``he_meta[field]``: a list of at most ``MAX_TENSORS`` entries of ``width`` items each."""
    entries = he_meta[field]
    if not (isinstance(entries, list | tuple) and len(entries) <= MAX_TENSORS):
        raise ValueError(f"packed HE model: {field} must be a list of at most {MAX_TENSORS} tensors")
    if not all(isinstance(e, list | tuple) and len(e) == width for e in entries):
        raise ValueError(f"packed HE model: each of its {field} entries must have {width} items")
    return entries


def value_bound(max_values: int | None) -> int:
    """The most float values a model may declare: ``max_values`` (the reader's own model), capped at MAX_VALUES."""
    return MAX_VALUES if max_values is None else min(int(max_values), MAX_VALUES)


def _check_layout(he_meta: Mapping, slots: int, max_values: int | None = None) -> None:
    """The declared layout adds up and fits ``slots`` (the context's) and ``max_values`` (see :func:`value_bound`),
    checked before anything is built from it: decryption slices the values by it."""
    n_values, chunks, limit = he_meta["n_values"], he_meta["chunks"], value_bound(max_values)
    if he_meta["slots"] != slots or isinstance(he_meta["slots"], bool):
        raise ValueError(
            f"packed HE model with {brief(he_meta['slots'])} slots per ciphertext, the context has {slots}"
        )
    if not _bounded_int(n_values, 1, limit):
        raise ValueError(
            f"packed HE model declares {brief(n_values)} values: at most {limit} expected "
            f"({'the global model' if max_values is not None else 'MAX_VALUES'})"
        )
    if not (_is_int(chunks) and chunks == -(-n_values // (2 * slots))):
        raise ValueError(f"packed HE model: {brief(chunks)} ciphertexts for {n_values} values ({2 * slots} each)")
    offset, names = 0, set()
    for name, shape, dtype, start in _entries(he_meta, "tensors", 4):
        if not _is_name(name) or name in names or _dtype_name(dtype) not in FLOAT_DTYPES or start != offset:
            raise ValueError(f"packed HE model: bad layout entry for tensor {brief(name)}")
        names.add(name)
        offset += _size(shape, n_values)
        if offset > n_values:
            raise ValueError(f"packed HE model: its tensors hold more values than n_values says ({n_values})")
    if offset != n_values:
        raise ValueError(f"packed HE model: its tensors hold {offset} values, n_values says {n_values}")
    plain_values = 0
    for name, shape, dtype in _entries(he_meta, "plain", 3):
        _check_plain_name(name, dtype)
        plain_values += _size(shape, MAX_TENSORS)
        if plain_values > MAX_TENSORS:  # step counters: one value each
            raise ValueError(f"packed HE model: its plaintext buffers hold more than {MAX_TENSORS} values")
        if name in names:
            raise ValueError(f"packed HE model: tensor {brief(name)} declared twice")
        names.add(name)


def _read_plain(data: Mapping[str, Any], he_meta: Mapping, weight: float) -> dict[str, np.ndarray]:
    """The plaintext buffers, each of exactly its declared shape (numpy would broadcast another one in) and each
    value a step count times ``weight`` at most (``MAX_STEP_COUNT``), so that sums stay finite."""
    plain = {}
    for name, shape, _ in he_meta["plain"]:
        value = data[name]
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf" or value.shape != _plain_shape(shape):
            got = f"{value.dtype} of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(
                f"plaintext {brief(name)}: {got}, declared shape {brief(shape)} (sent as {brief(_plain_shape(shape))})"
            )
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"plaintext {brief(name)} holds NaN or infinity")
        if not np.all(np.abs(value) <= weight * MAX_STEP_COUNT):
            raise ValueError(f"plaintext {brief(name)} holds more than {MAX_STEP_COUNT} steps x its weight {weight:g}")
        plain[name] = value
    return plain
