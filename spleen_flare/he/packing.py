"""Packed CKKS model updates: all float tensors of a model in as few CKKS ciphertexts as the slots allow.

What travels (and what the server keeps) for one packed model:
- ``data``: ``{"he/ct/00000": blob, ...}``, one blob per ciphertext (see below), plus the integer tensors
  (BatchNorm's ``num_batches_tracked``) in plaintext under their own names, as float64;
- ``meta[HE_META_KEY]``: the plaintext layout (names, shapes, dtypes, offsets into the flat vector), the slot
  count, the total aggregation weight ``W``, the number of contributions ``K`` and the ciphertexts' SEAL
  parameters (parms_id, scale; no key).
Values are ``w * x`` for one client update and ``sum_i w_i * x_i`` for an aggregate; a site decrypts and divides
by ``W``, which is FedAvg. The server only adds (no multiplication, no key, no decryption).

How a site encrypts (:func:`encrypt_model`): it multiplies its values by its weight in plaintext and packs 8192
of them into one ciphertext: CKKS slots are complex, so 4096 values go in the real parts and the next 4096 in the
imaginary parts (sums stay slot-wise, so FedAvg is unchanged). It encodes them directly at the LOWEST modulus
level (one 60-bit prime instead of the two a fresh TenSEAL vector carries) and encrypts them with its secret key
(the provisioned context is symmetric). A symmetric CKKS ciphertext is a pair ``(c0, c1)`` where ``c1`` is
uniformly random: SEAL draws it from a public 64-byte seed, so a ciphertext is fully given by ``c0`` and that
seed. A blob is ``c0`` (N x L little-endian uint64: 64 KiB at the lowest level) followed by ``K`` SEAL PRNG
records (81 bytes each, the seed of each contribution): 2x the fp32 bytes, against 16x for a
fresh TenSEAL vector of real values.

How the server adds (:class:`PackedSum`): a sum of ciphertexts is ``(sum c0 mod q, sum c1)``, and ``sum c1`` is
the sum of the contributions' seed expansions, so the server adds the ``c0`` polynomials modulo the ciphertext
prime (numpy, no SEAL) and keeps the seeds; the aggregate stays at 2x. A site rebuilds each ciphertext with SEAL
(``(c0, expand(seed_1)) + (0, expand(seed_2)) + ...``) and decrypts it. The seeds are public by design; the
server learns from them exactly what it would learn from ``c1``.

TenSEAL's Python API cannot encrypt at a chosen level or expose the seed, so this uses TenSEAL's bundled SEAL API
(``tenseal.sealapi``) and SEAL 4's documented serialization layout (header, ciphertext members, DynArray, PRNG
info); :func:`as_ckks_vector` turns a blob back into a TenSEAL CKKSVector.

Range: at the lowest level a slot's magnitude times the scale must stay below half the remaining prime, i.e.
``|sum| < 2^19`` for scale 2^40 and a 60-bit prime (for a complex slot, ``|re + i im|``); :func:`encrypt_model`
refuses updates that could exceed half of that.
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
import zstandard

HE_META_KEY = "spleen_he_packed"
FORMAT_VERSION = 3
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


# -- SEAL 4 serialization: header, Ciphertext members, DynArray, UniformRandomGeneratorInfo ----------------------
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compression, reserved, total size
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
_MEMBERS = struct.Struct("<32sBQQQdQ")  # parms_id, is_ntt_form, size, poly degree, moduli, scale, correction
SEED_RECORD_BYTES = _HEADER.size + 1 + 64  # a saved UniformRandomGeneratorInfo: header, PRNG type, 512-bit seed


class SealFormatError(ValueError):
    """Bytes that are not the SEAL ciphertext layout this module reads and writes."""


def _header(total: int, version: tuple[int, int]) -> bytes:
    return _HEADER.pack(_SEAL_MAGIC, _HEADER.size, version[0], version[1], _COMPR_NONE, 0, total)


def _split_seeded(seal_bytes: bytes) -> tuple[dict, bytes, bytes]:
    """A saved seeded ciphertext -> (its SEAL parameters, c0 bytes, the 81-byte seed record)."""
    magic, hsize, major, minor, compr, _, total = _HEADER.unpack_from(seal_bytes)
    if magic != _SEAL_MAGIC or hsize != _HEADER.size or total != len(seal_bytes):
        raise SealFormatError("not a SEAL object")
    body = seal_bytes[_HEADER.size :]
    if compr == _COMPR_ZSTD:
        body = zstandard.ZstdDecompressor().decompress(body, max_output_size=64 * len(seal_bytes))
    elif compr != _COMPR_NONE:
        raise SealFormatError(f"SEAL compression mode {compr} is not supported")
    parms_id, ntt, size, degree, moduli, scale, correction = _MEMBERS.unpack_from(body)
    offset = _MEMBERS.size
    magic, _, _, _, _, _, dyn_total = _HEADER.unpack_from(body, offset)
    (count,) = struct.unpack_from("<Q", body, offset + _HEADER.size)
    c0_start = offset + _HEADER.size + 8
    c0_end = c0_start + 8 * count
    layout_ok = magic == _SEAL_MAGIC and dyn_total == c0_end - offset and len(body) == c0_end + SEED_RECORD_BYTES
    if size != 2 or count != degree * moduli or not layout_ok:
        raise SealFormatError("not a seeded two-polynomial SEAL ciphertext")
    params = {
        "parms_id": parms_id.hex(),
        "ntt": ntt,
        "degree": degree,
        "moduli": moduli,
        "scale": scale,
        "correction": correction,
        "seal_version": [major, minor],
    }
    return params, body[c0_start:c0_end], body[c0_end:]


def _seeded_bytes(params: Mapping, c0: bytes, seed_record: bytes) -> bytes:
    """The SEAL bytes of the seeded ciphertext (c0, expand(seed)), uncompressed."""
    version = tuple(params["seal_version"])
    dyn = struct.pack("<Q", len(c0) // 8) + c0
    members = (
        _MEMBERS.pack(
            bytes.fromhex(params["parms_id"]),
            params["ntt"],
            2,
            params["degree"],
            params["moduli"],
            params["scale"],
            params["correction"],
        )
        + _header(_HEADER.size + len(dyn), version)
        + dyn
        + seed_record
    )
    return _header(_HEADER.size + len(members), version) + members


def _parms_id_hex(parms_id: list[int]) -> str:
    return struct.pack("<4Q", *parms_id).hex()


class _SealFile:
    """A path SEAL can save to and load from, with read/write by descriptor (sealapi only takes paths)."""

    def __enter__(self):
        self._scratch = _scratch_file()
        self.path, self.fd = self._scratch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._scratch.__exit__(*exc)

    def read(self) -> bytes:
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def write(self, data: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(data)


class _SeededEncryptor(_SealFile):
    """Encodes at the lowest level and encrypts with the secret key; returns (SEAL parameters, c0, seed record)."""

    def __init__(self, ctx: ts.Context) -> None:
        if not ctx.is_private():
            raise ValueError("encrypting needs the site's secret key (client_context.tenseal)")
        seal_context = ctx.seal_context().data
        self.scale = ctx.global_scale
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.encryptor = sealapi.Encryptor(seal_context, ctx.secret_key().data)
        self.parms_id = seal_context.last_parms_id()

    def __call__(self, values: np.ndarray) -> tuple[dict, bytes, bytes]:
        """Encrypt up to ``slots`` complex values."""
        plain = sealapi.Plaintext()
        # Python complex numbers and a float scale select SEAL's complex encode; a numpy array with an int scale
        # would reach the real overload and drop the imaginary parts (numpy only warns)
        self.encoder.encode(np.asarray(values, dtype=complex).tolist(), self.parms_id, float(self.scale), plain)
        # Serializable<Ciphertext>: SEAL keeps the seed of the random half when it saves
        self.encryptor.encrypt_symmetric(plain).save(self.path)
        return _split_seeded(self.read())


class _Rebuilder(_SealFile):
    """Blob -> full SEAL ciphertext: ``(c0, expand(seed_1)) + (0, expand(seed_2)) + ...``."""

    def __init__(self, ctx: ts.Context, he_meta: Mapping) -> None:
        self.seal_context = ctx.seal_context().data
        self.params = he_meta["ciphertext"]
        self.contributions = int(he_meta["contributions"])
        if self.params["parms_id"] != _parms_id_hex(self.seal_context.last_parms_id()):
            raise ValueError("packed HE model made with other CKKS parameters than this context's")
        self.c0_bytes = 8 * self.params["degree"] * self.params["moduli"]
        self.zeros = bytes(self.c0_bytes)
        self.evaluator = sealapi.Evaluator(self.seal_context)

    def __call__(self, blob: bytes) -> sealapi.Ciphertext:
        if len(blob) != self.c0_bytes + self.contributions * SEED_RECORD_BYTES:
            raise SealFormatError(f"ciphertext blob of {len(blob)} bytes for {self.contributions} contributions")
        total = None
        for j in range(self.contributions):
            record = blob[self.c0_bytes + j * SEED_RECORD_BYTES : self.c0_bytes + (j + 1) * SEED_RECORD_BYTES]
            self.write(_seeded_bytes(self.params, blob[: self.c0_bytes] if j == 0 else self.zeros, record))
            ct = sealapi.Ciphertext()
            ct.load(self.seal_context, self.path)  # SEAL checks the parameters and expands the seed
            if total is None:
                total = ct
            else:
                self.evaluator.add_inplace(total, ct)
        return total


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
    slots = slot_count(ctx)
    per_ct = 2 * slots  # complex packing: real parts, then imaginary parts
    chunks = -(-flat.size // per_ct)
    z = np.zeros((chunks, 2, slots))
    z.reshape(-1)[: flat.size] = flat * float(weight)
    z = z[:, 0, :] + 1j * z[:, 1, :]
    peak = float(np.max(np.abs(z)))
    limit = max_abs_value(ctx) / 2  # half the modulus range: headroom for CKKS noise
    if not math.isfinite(peak) or peak * max_clients >= limit:
        raise HERangeError(
            f"CKKS range exceeded: max|weight*x| = {peak:.4g} (weight {weight:g}) x max_clients {max_clients} >= "
            f"{limit:.4g}; lower weight_scale (normalize the aggregation weights) in the HE encryptor args of "
            "config_fed_client.json"
        )

    data: dict[str, Any] = {}
    ct_params: dict = {}
    with _SeededEncryptor(ctx) as encrypt:
        for k in range(chunks):
            ct_params, c0, seed_record = encrypt(z[k])
            data[ct_key(k)] = c0 + seed_record
    plain = []
    for name in others:
        a = arrays[name]
        plain.append([name, list(a.shape), str(a.dtype)])
        data[name] = np.atleast_1d(a).astype(np.float64) * weight  # at least 1-d: a 0-d product is a numpy scalar
    he_meta = {
        "version": FORMAT_VERSION,
        "slots": slots,
        "packing": "complex",
        "n_values": int(flat.size),
        "chunks": chunks,
        "tensors": tensors,
        "plain": plain,
        "weight": float(weight),
        "contributions": 1,
        "level": "lowest",
        "ciphertext": ct_params,
    }
    return data, he_meta


def _layout(meta: Mapping) -> tuple:
    return (meta["version"], meta["slots"], meta["packing"], meta["n_values"], meta["chunks"]) + tuple(
        map(str, (meta["tensors"], meta["plain"], meta["ciphertext"]))
    )


def _check_version(he_meta: Mapping) -> None:
    if he_meta.get("version") != FORMAT_VERSION or he_meta.get("packing") != "complex":
        raise ValueError(f"unknown packed HE format version {he_meta.get('version')!r}")


class PackedSum:
    """Running sum of packed models: c0 polynomials added modulo the ciphertext primes, seeds kept; no key."""

    def __init__(self, ctx: ts.Context) -> None:
        last = ctx.seal_context().data.last_context_data()
        self.parms_id = _parms_id_hex(last.parms_id())
        self.moduli = np.array([m.value() for m in last.parms().coeff_modulus()], dtype=np.uint64)[:, None]
        self.meta: dict | None = None
        self._c0: np.ndarray | None = None  # (chunks, moduli, degree) uint64
        self._seeds: list[bytes] = []  # per ciphertext, the seed records of every contribution so far
        self._plain: dict[str, np.ndarray] = {}

    @property
    def count(self) -> int:
        return 0 if self.meta is None else int(self.meta["contributions"])

    def add(self, data: Mapping[str, Any], he_meta: Mapping) -> None:
        _check_version(he_meta)
        if self.meta is not None and _layout(he_meta) != _layout(self.meta):
            raise ValueError("packed HE update with a different layout (model or HE parameters differ between sites)")
        params, contributions = he_meta["ciphertext"], int(he_meta["contributions"])
        if params.get("parms_id") != self.parms_id:
            raise ValueError("packed HE update made with other CKKS parameters than the server's context")
        shape = (int(params["moduli"]), int(params["degree"]))
        c0_bytes = 8 * shape[0] * shape[1]
        c0 = np.empty((he_meta["chunks"], *shape), dtype=np.uint64)
        seeds = []
        for k in range(he_meta["chunks"]):
            blob = data[ct_key(k)]
            if not isinstance(blob, bytes) or len(blob) != c0_bytes + contributions * SEED_RECORD_BYTES:
                raise SealFormatError(f"ciphertext {k}: not a packed blob for {contributions} contribution(s)")
            c0[k] = np.frombuffer(blob, dtype="<u8", count=shape[0] * shape[1]).reshape(shape)
            records = blob[c0_bytes:]
            for j in range(contributions):
                if _HEADER.unpack_from(records, j * SEED_RECORD_BYTES)[0] != _SEAL_MAGIC:
                    raise SealFormatError(f"ciphertext {k}: seed record {j} is not a SEAL object")
            seeds.append(records)
        if np.any(c0 >= self.moduli):
            raise SealFormatError("ciphertext coefficients outside the modulus")
        plain = {name: np.atleast_1d(np.asarray(data[name], dtype=np.float64)) for name, _, _ in he_meta["plain"]}
        if self.meta is None:
            self.meta = dict(he_meta)
            self._c0, self._seeds, self._plain = c0, seeds, plain
            return
        self._c0 += c0  # < 2^61 for primes below 2^60: no overflow
        np.subtract(self._c0, self.moduli, out=self._c0, where=self._c0 >= self.moduli)
        self._seeds = [mine + theirs for mine, theirs in zip(self._seeds, seeds, strict=True)]
        for name, value in plain.items():
            self._plain[name] = self._plain[name] + value
        self.meta["weight"] += float(he_meta["weight"])
        self.meta["contributions"] += contributions

    def result(self) -> tuple[dict[str, Any], dict]:
        if self.meta is None or self._c0 is None:
            raise ValueError("no packed HE update to aggregate")
        c0 = self._c0.astype("<u8", copy=False)
        data: dict[str, Any] = {ct_key(k): c0[k].tobytes() + seeds for k, seeds in enumerate(self._seeds)}
        data.update(self._plain)
        return data, dict(self.meta)


def decrypt_model(data: Mapping[str, Any], he_meta: Mapping, ctx: ts.Context) -> dict[str, np.ndarray]:
    """Decrypt a packed model with the secret key and divide by its total weight: ``{name: array}``."""
    if not ctx.is_private():
        raise ValueError("decrypting needs the secret key (client_context.tenseal), this context is public")
    _check_version(he_meta)
    seal_context = ctx.seal_context().data
    decryptor = sealapi.Decryptor(seal_context, ctx.secret_key().data)
    encoder = sealapi.CKKSEncoder(seal_context)
    parts = []
    with _Rebuilder(ctx, he_meta) as rebuild:
        for k in range(he_meta["chunks"]):
            plain = sealapi.Plaintext()
            decryptor.decrypt(rebuild(data[ct_key(k)]), plain)
            z = np.array(encoder.decode_complex(plain), dtype=complex)
            parts += [z.real, z.imag]
    divisor = float(he_meta["weight"])
    flat = (np.concatenate(parts) if parts else np.zeros(0))[: he_meta["n_values"]] / divisor
    out: dict[str, np.ndarray] = {}
    for name, shape, dtype, offset in he_meta["tensors"]:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[offset : offset + size].reshape(shape).astype(dtype)
    for name, shape, dtype in he_meta["plain"]:
        value = np.asarray(data[name], dtype=np.float64) / divisor
        out[name] = (np.rint(value) if np.dtype(dtype).kind in "iub" else value).astype(dtype).reshape(shape)
    return out


def as_ckks_vector(blob: bytes, he_meta: Mapping, ctx: ts.Context) -> ts.CKKSVector:
    """One blob as a TenSEAL CKKSVector under ``ctx`` (public or secret), to inspect it with TenSEAL.

    TenSEAL decrypts the real parts only: the first half of the blob's values.
    """
    _check_version(he_meta)
    with _Rebuilder(ctx, he_meta) as rebuild:
        rebuild(blob).save(rebuild.path)
        seal_bytes = rebuild.read()
    return ts.ckks_vector_from(
        ctx, ckks_vector_bytes(seal_bytes, int(he_meta["slots"]), he_meta["ciphertext"]["scale"])
    )


def packed_bytes(data: Mapping[str, Any]) -> int:
    """Payload bytes of a packed model: ciphertexts plus plaintext integer tensors."""
    return sum(len(v) if isinstance(v, bytes) else np.asarray(v).nbytes for v in data.values())
