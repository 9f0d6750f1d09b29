"""Packed CKKS model updates: all float tensors of a model in as few CKKS ciphertexts as the slots allow.

What travels (and what the server keeps) for one packed model:
- ``data``: ``{"he/ct/00000": ciphertext bytes, ...}``, each ciphertext serialized WITHOUT a TenSEAL context
  (the server has the public context from its kit, the sites the secret one), plus the integer tensors
  (BatchNorm's ``num_batches_tracked``) in plaintext under their own names, as float64;
- ``meta[HE_META_KEY]``: the plaintext layout (names, shapes, dtypes, offsets into the flat vector), the slot
  count and the total aggregation weight ``W``.
Values are ``w * x`` for one client update and ``sum_i w_i * x_i`` for an aggregate; a site decrypts and divides
by ``W``, which is FedAvg. The client multiplies each fresh ciphertext by its weight: the plain multiplication
rescales it to the lowest modulus level (one 60-bit prime instead of two primes), which halves its size, and the
server then only adds ciphertexts (no multiplication, no key, no decryption).

Range: at the lowest level a value times the scale must stay below the remaining prime, i.e. ``|sum| < 2^19``
for scale 2^40 and a 60-bit prime; :func:`encrypt_model` refuses updates that could exceed half of that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tenseal as ts

HE_META_KEY = "spleen_he_packed"
FORMAT_VERSION = 1
CT_PREFIX = "he/ct/"


class HERangeError(ValueError):
    """A weighted update could overflow the CKKS modulus at the lowest level."""


def ct_key(index: int) -> str:
    return f"{CT_PREFIX}{index:05d}"


def slot_count(ctx: ts.Context) -> int:
    """CKKS slots per ciphertext (poly_modulus_degree / 2)."""
    return ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def max_abs_value(ctx: ts.Context) -> float:
    """Largest |value| a ciphertext at the lowest level can hold: 2^(bits of the last prime - scale bits - 1)."""
    low_bits = ctx.seal_context().data.last_context_data().total_coeff_modulus_bit_count()
    return 2.0 ** (low_bits - math.log2(ctx.global_scale) - 1)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def is_packed(meta: Mapping | None) -> bool:
    return bool(meta) and HE_META_KEY in meta


def encrypt_model(
    params: Mapping[str, Any], ctx: ts.Context, weight: float, max_clients: int = 8
) -> tuple[dict[str, Any], dict]:
    """Pack and encrypt ``weight * params``; returns ``(data, he_meta)`` (see the module docstring).

    ``max_clients``: how many such updates the server may add up; the range check allows for that many.
    """
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
        raise ValueError(f"aggregation weight must be a positive number, got {weight!r}")
    arrays = {name: _to_numpy(v) for name, v in params.items()}
    floats = [n for n, a in arrays.items() if a.dtype.kind == "f"]
    others = [n for n, a in arrays.items() if a.dtype.kind != "f"]
    if not floats:
        raise ValueError("nothing to encrypt: the model has no floating-point tensors")

    tensors, offset = [], 0
    for name in floats:
        a = arrays[name]
        tensors.append([name, list(a.shape), str(a.dtype), offset])
        offset += a.size
    flat = np.concatenate([arrays[n].ravel().astype(np.float64) for n in floats])
    peak = float(np.max(np.abs(flat))) * weight if flat.size else 0.0
    limit = max_abs_value(ctx) / 2  # half the modulus range: headroom for CKKS noise
    if not math.isfinite(peak) or peak * max_clients >= limit:
        raise HERangeError(
            f"CKKS range exceeded: max|weight*x| = {peak:.4g} (weight {weight:g}) x max_clients {max_clients} >= "
            f"{limit:.4g}; lower weight_scale (normalize the aggregation weights) in the HE encryptor args of "
            "config_fed_client.json"
        )

    slots = slot_count(ctx)
    data: dict[str, Any] = {}
    for k, start in enumerate(range(0, flat.size, slots)):
        # encrypt, then multiply by the weight: the rescale drops the ciphertext to the lowest level
        data[ct_key(k)] = (ts.ckks_vector(ctx, flat[start : start + slots]) * float(weight)).serialize()
    plain = []
    for name in others:
        a = arrays[name]
        plain.append([name, list(a.shape), str(a.dtype)])
        data[name] = np.atleast_1d(a).astype(np.float64) * weight  # 1-d: FOBS has no decomposer for numpy scalars
    he_meta = {
        "version": FORMAT_VERSION,
        "slots": slots,
        "n_values": int(flat.size),
        "chunks": len(data) - len(others),
        "tensors": tensors,
        "plain": plain,
        "weight": float(weight),
        "contributions": 1,
        "rescales": 1,
    }
    return data, he_meta


def _layout(meta: Mapping) -> tuple:
    return (meta["version"], meta["slots"], meta["n_values"], meta["chunks"], meta["rescales"]) + tuple(
        map(str, (meta["tensors"], meta["plain"]))
    )


class PackedSum:
    """Running sum of packed models under the public context: ciphertexts are added, nothing is decrypted."""

    def __init__(self, ctx: ts.Context) -> None:
        self.ctx = ctx
        self.meta: dict | None = None
        self._vectors: list[ts.CKKSVector] = []
        self._plain: dict[str, np.ndarray] = {}

    @property
    def count(self) -> int:
        return 0 if self.meta is None else int(self.meta["contributions"])

    def add(self, data: Mapping[str, Any], he_meta: Mapping) -> None:
        if self.meta is not None and _layout(he_meta) != _layout(self.meta):
            raise ValueError("packed HE update with a different layout (model or HE parameters differ between sites)")
        vectors = [ts.ckks_vector_from(self.ctx, data[ct_key(k)]) for k in range(he_meta["chunks"])]
        plain = {name: np.atleast_1d(np.asarray(data[name], dtype=np.float64)) for name, _, _ in he_meta["plain"]}
        if self.meta is None:
            self.meta = dict(he_meta)
            self._vectors, self._plain = vectors, plain
            return
        for acc, v in zip(self._vectors, vectors, strict=True):
            acc.add_(v)
        for name, value in plain.items():
            self._plain[name] = self._plain[name] + value
        self.meta["weight"] += float(he_meta["weight"])
        self.meta["contributions"] += int(he_meta["contributions"])

    def result(self) -> tuple[dict[str, Any], dict]:
        if self.meta is None:
            raise ValueError("no packed HE update to aggregate")
        data: dict[str, Any] = {ct_key(k): v.serialize() for k, v in enumerate(self._vectors)}
        data.update(self._plain)
        return data, dict(self.meta)


def rescale_gain(ctx: ts.Context) -> float:
    """Factor one plain multiplication + rescale puts on decrypted values.

    TenSEAL sets the scale after a rescale to exactly 2^40 while the true scale is 2^80 / q (q the dropped prime,
    close to but not 2^40), so decrypted values come out larger by a fixed factor (about 1 + 6.7e-7 here).
    Measured once with the secret key on a vector of ones, then divided out.
    """
    ones = np.ones(slot_count(ctx))
    return float(np.mean((ts.ckks_vector(ctx, ones) * 1.0).decrypt()))


def decrypt_model(
    data: Mapping[str, Any], he_meta: Mapping, ctx: ts.Context, gain: float | None = None
) -> dict[str, np.ndarray]:
    """Decrypt a packed model with the secret key and divide by its total weight: ``{name: array}``."""
    if not ctx.is_private():
        raise ValueError("decrypting needs the secret key (client_context.tenseal), this context is public")
    if he_meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown packed HE format version {he_meta.get('version')!r}")
    gain = rescale_gain(ctx) if gain is None else gain
    divisor = float(he_meta["weight"]) * gain ** int(he_meta["rescales"])
    parts = [np.asarray(ts.ckks_vector_from(ctx, data[ct_key(k)]).decrypt()) for k in range(he_meta["chunks"])]
    flat = (np.concatenate(parts) if parts else np.zeros(0))[: he_meta["n_values"]] / divisor
    out: dict[str, np.ndarray] = {}
    for name, shape, dtype, offset in he_meta["tensors"]:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[offset : offset + size].reshape(shape).astype(dtype)
    for name, shape, dtype in he_meta["plain"]:
        value = np.asarray(data[name], dtype=np.float64) / float(he_meta["weight"])
        out[name] = (np.rint(value) if np.dtype(dtype).kind in "iub" else value).astype(dtype).reshape(shape)
    return out


def packed_bytes(data: Mapping[str, Any]) -> int:
    """Payload bytes of a packed model: ciphertexts plus plaintext integer tensors."""
    return sum(len(v) if isinstance(v, bytes) else np.asarray(v).nbytes for v in data.values())
