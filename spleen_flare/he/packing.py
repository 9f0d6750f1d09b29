"""Packed CKKS model updates: all float tensors of a model in as few CKKS ciphertexts as the slots allow.

What travels (and what the server keeps) for one packed model:
- ``data``: ``{"he/ct/00000": ciphertext, ...}``, each a TenSEAL CKKSVector serialized WITHOUT a TenSEAL context
  (the server has its public context from its kit, the sites the secret one), plus the integer tensors
  (BatchNorm's ``num_batches_tracked``) in plaintext under their own names, as float64;
- ``meta[HE_META_KEY]``: the plaintext layout (names, shapes, dtypes, offsets into the flat vector), the slot
  count and the total aggregation weight ``W``.
Values are ``w * x`` for one client update and ``sum_i w_i * x_i`` for an aggregate; a site decrypts and divides
by ``W``, which is FedAvg. The server only adds ciphertexts (no multiplication, no key, no decryption).

How a site encrypts (:func:`encrypt_model`): it multiplies its values by its weight in plaintext, encodes them
directly at the LOWEST modulus level (one 60-bit prime instead of the two a fresh TenSEAL vector carries) and
encrypts them with its secret key (the provisioned context is symmetric), which lets SEAL store the random half
of the ciphertext as a 64-byte seed: 65.7 KB per 4096 values, 4x the fp32 bytes, against 16x for a fresh TenSEAL
vector. The server expands the seed when it loads the ciphertext; its sums are full lowest-level ciphertexts
(131 KB per 4096 values, 8x). TenSEAL's Python API cannot encrypt at a chosen level or keep the seed, so this
uses TenSEAL's bundled SEAL API (``tenseal.sealapi``) and wraps the SEAL bytes in TenSEAL's CKKSVector format.

Range: at the lowest level a value times the scale must stay below half the remaining prime, i.e.
``|sum| < 2^19`` for scale 2^40 and a 60-bit prime; :func:`encrypt_model` refuses updates that could exceed
half of that.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

HE_META_KEY = "spleen_he_packed"
FORMAT_VERSION = 2
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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ckks_vector_bytes(seal_ciphertext: bytes, size: int, scale: float) -> bytes:
    """TenSEAL's serialized CKKSVector (protobuf ``CKKSVectorProto``: sizes=1, ciphertexts=2, scale=3)."""
    sizes = _varint(size)
    return (
        b"\x0a"
        + _varint(len(sizes))
        + sizes
        + b"\x12"
        + _varint(len(seal_ciphertext))
        + seal_ciphertext
        + b"\x19"
        + struct.pack("<d", scale)
    )


@contextlib.contextmanager
def _scratch_file() -> Iterator[tuple[str, int]]:
    """A path SEAL can save to and a descriptor to read it back: in memory (memfd) where the OS has it."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("spleen-he-ciphertext")
        try:
            yield f"/proc/self/fd/{fd}", fd
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="spleen-he-") as tmp:
        path = os.path.join(tmp, "ciphertext")
        open(path, "wb").close()
        fd = os.open(path, os.O_RDONLY)
        try:
            yield path, fd
        finally:
            os.close(fd)


class _SeededEncryptor:
    """Encodes at the lowest level and encrypts with the secret key; returns TenSEAL CKKSVector bytes."""

    def __init__(self, ctx: ts.Context) -> None:
        if not ctx.is_private():
            raise ValueError("encrypting needs the site's secret key (client_context.tenseal)")
        seal_context = ctx.seal_context().data
        self.scale = ctx.global_scale
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.encryptor = sealapi.Encryptor(seal_context, ctx.secret_key().data)
        self.parms_id = seal_context.last_parms_id()

    def __enter__(self):
        self._scratch = _scratch_file()
        self.path, self.fd = self._scratch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._scratch.__exit__(*exc)

    def __call__(self, values: np.ndarray) -> bytes:
        plain = sealapi.Plaintext()
        self.encoder.encode(values, self.parms_id, self.scale, plain)
        # Serializable<Ciphertext>: SEAL keeps the seed of the random half; sealapi saves it to a path only
        self.encryptor.encrypt_symmetric(plain).save(self.path)
        seal_bytes = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        return ckks_vector_bytes(seal_bytes, len(values), self.scale)


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
    weighted = flat * float(weight)
    with _SeededEncryptor(ctx) as encrypt:
        for k, start in enumerate(range(0, flat.size, slots)):
            data[ct_key(k)] = encrypt(weighted[start : start + slots])
    plain = []
    for name in others:
        a = arrays[name]
        plain.append([name, list(a.shape), str(a.dtype)])
        data[name] = np.atleast_1d(a).astype(np.float64) * weight  # at least 1-d: a 0-d product is a numpy scalar
    he_meta = {
        "version": FORMAT_VERSION,
        "slots": slots,
        "n_values": int(flat.size),
        "chunks": len(data) - len(others),
        "tensors": tensors,
        "plain": plain,
        "weight": float(weight),
        "contributions": 1,
        "level": "lowest",
    }
    return data, he_meta


def _layout(meta: Mapping) -> tuple:
    return (meta["version"], meta["slots"], meta["n_values"], meta["chunks"]) + tuple(
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


def decrypt_model(data: Mapping[str, Any], he_meta: Mapping, ctx: ts.Context) -> dict[str, np.ndarray]:
    """Decrypt a packed model with the secret key and divide by its total weight: ``{name: array}``."""
    if not ctx.is_private():
        raise ValueError("decrypting needs the secret key (client_context.tenseal), this context is public")
    if he_meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown packed HE format version {he_meta.get('version')!r}")
    divisor = float(he_meta["weight"])
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
