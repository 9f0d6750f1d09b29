"""Checks on a packed HE model's metadata, blobs' parameters and plaintext buffers, before anything uses them.

Why every field: the server cannot decrypt, so a malformed or replayed update (a zero-contribution c0, a buffer
that numpy would broadcast, a layout that does not add up, more contributions than the sites' range check allowed
for) would only surface as garbage at every site, one round later; a site slices and reshapes the decrypted
values by the layout. :class:`~spleen_flare.he.packing.PackedSum` and :func:`~spleen_flare.he.packing.decrypt_model`
run these checks against their own context. The metadata schema (version, fields, the one name that may travel in
clear) is defined here, where it is enforced; ``packing`` writes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _positive_weight(weight: Any, what: str) -> float:
    """A finite real number > 0 (bools, NaN and infinities are refused)."""
    real = isinstance(weight, int | float | np.integer | np.floating) and not isinstance(weight, bool)
    if not (real and math.isfinite(weight) and weight > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {weight!r}")
    return float(weight)


def _dtype_kind(dtype: Any) -> str:
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "?"


def _check_plain_name(name: Any, dtype: Any) -> None:
    """Only BatchNorm's integer step counter may travel unencrypted."""
    if not (isinstance(name, str) and name.endswith(PLAIN_SUFFIX) and _dtype_kind(dtype) in "iu"):
        raise ValueError(
            f"HE: tensor {name!r} ({dtype}) would travel unencrypted: only BatchNorm's integer {PLAIN_SUFFIX} may; "
            "cast it to float or leave it out of the model"
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
            f"unknown packed HE format version {version!r} (this code reads {FORMAT_VERSION}): run the same "
            "spleen_flare on every participant"
        )
    if set(he_meta) != META_KEYS:
        raise ValueError(f"packed HE metadata with missing or unexpected fields {sorted(set(he_meta) ^ META_KEYS)}")


def _check_counts(he_meta: Mapping) -> tuple[float, int, int]:
    """(weight, contributions, max_clients), each checked: more contributions than max_clients may have wrapped."""
    weight = _positive_weight(he_meta["weight"], "packed HE model weight")
    contributions, max_clients = he_meta["contributions"], he_meta["max_clients"]
    if not (_is_int(max_clients) and max_clients >= 1):
        raise ValueError(f"packed HE model: max_clients must be an integer >= 1, got {max_clients!r}")
    if not (_is_int(contributions) and 1 <= contributions <= max_clients):
        raise ValueError(
            f"packed HE model: contributions must be an integer from 1 to max_clients {max_clients}, "
            f"got {contributions!r}"
        )
    return weight, int(contributions), int(max_clients)


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
                f"packed HE model made with other CKKS parameters than {whose} context ({field} {got!r}, expected "
                f"{want!r}): {_FIX_KEY}"
            )


def _size(shape: Any) -> int:
    if not (isinstance(shape, list | tuple) and all(_is_int(d) and d >= 0 for d in shape)):
        raise ValueError(f"packed HE model: {shape!r} is not a tensor shape")
    return math.prod(int(d) for d in shape)


def _check_layout(he_meta: Mapping, slots: int) -> None:
    """The declared layout adds up and fits ``slots`` (the context's): decryption slices the values by it."""
    n_values, chunks = he_meta["n_values"], he_meta["chunks"]
    if he_meta["slots"] != slots or isinstance(he_meta["slots"], bool):
        raise ValueError(f"packed HE model with {he_meta['slots']!r} slots per ciphertext, the context has {slots}")
    if not (_is_int(n_values) and n_values >= 1 and _is_int(chunks) and chunks == -(-n_values // (2 * slots))):
        raise ValueError(f"packed HE model: {chunks!r} ciphertexts for {n_values!r} values ({2 * slots} each)")
    offset, names = 0, set()
    for name, shape, dtype, start in he_meta["tensors"]:
        if not isinstance(name, str) or name in names or _dtype_kind(dtype) != "f" or start != offset:
            raise ValueError(f"packed HE model: bad layout entry for tensor {name!r}")
        names.add(name)
        offset += _size(shape)
    if offset != n_values:
        raise ValueError(f"packed HE model: its tensors hold {offset} values, n_values says {n_values}")
    for name, shape, dtype in he_meta["plain"]:
        _check_plain_name(name, dtype)
        _size(shape)
        if name in names:
            raise ValueError(f"packed HE model: tensor {name!r} declared twice")
        names.add(name)


def _read_plain(data: Mapping[str, Any], he_meta: Mapping) -> dict[str, np.ndarray]:
    """The plaintext buffers, each of exactly its declared shape (numpy would broadcast another one in)."""
    plain = {}
    for name, shape, _ in he_meta["plain"]:
        value = np.asarray(data[name])
        if value.dtype.kind not in "iuf" or value.shape != _plain_shape(shape):
            raise ValueError(
                f"plaintext {name!r}: {value.dtype} of shape {value.shape}, declared {shape} "
                f"(sent as {_plain_shape(shape)})"
            )
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"plaintext {name!r} holds NaN or infinity")
        plain[name] = value
    return plain
