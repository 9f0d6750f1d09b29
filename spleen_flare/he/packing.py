"""Packed CKKS model updates: all float tensors of a model in as few CKKS ciphertexts as the slots allow.

The design and the reasons for it: docs/design.md, "spleen_flare/he/packing.py".
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from spleen_flare.he.keys import FINGERPRINT_RE, check_key, checked_fingerprint, key_fingerprint
from spleen_flare.he.seal_format import (
    SEED_RECORD_BYTES,
    SealFormatError,
    _parms_id_hex,
    _SealFile,
    _seed,
    _seeded_bytes,
    _split_seeded,
    ckks_vector_bytes,
    seal_body,
    seal_version,
)
from spleen_flare.he.validation import (
    FORMAT_VERSION,
    META_KEYS,
    PLAIN_SUFFIX,
    _check_ciphertext,
    _check_counts,
    _check_format,
    _check_layout,
    _check_plain_name,
    _layout,
    _positive_weight,
    _read_plain,
    brief_names,
    check_max_clients,
    expected_ciphertext,
)

# the public names of the packed format; those defined in keys, seal_format and validation are re-exported here
__all__ = [
    "CT_PREFIX",
    "FINGERPRINT_RE",
    "FORMAT_VERSION",
    "HE_META_KEY",
    "META_KEYS",
    "PLAIN_SUFFIX",
    "SEED_RECORD_BYTES",
    "HERangeError",
    "PackedSum",
    "SealFormatError",
    "as_ckks_vector",
    "check_key",
    "checked_fingerprint",
    "ckks_vector_bytes",
    "ct_key",
    "decrypt_model",
    "encrypt_model",
    "expected_ciphertext",
    "is_packed",
    "key_fingerprint",
    "max_abs_value",
    "packed_bytes",
    "seal_body",
    "seal_version",
    "slot_count",
]

HE_META_KEY = "spleen_he_packed"
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


def _check_range(z: np.ndarray, weight: float, max_clients: int, ctx: ts.Context) -> None:
    peak = float(np.max(np.abs(z)))
    limit = max_abs_value(ctx) / 2  # half the modulus range: headroom for CKKS noise
    if not math.isfinite(peak) or peak * max_clients >= limit:
        raise HERangeError(
            f"CKKS range exceeded: max|weight*x| = {peak:.4g} (weight {weight:g}) x max_clients {max_clients} >= "
            f"{limit:.4g}; lower weight_scale (normalize the aggregation weights) in the HE encryptor args of "
            "config_fed_client.json"
        )


def _pack(floats: Mapping[str, np.ndarray], slots: int, weight: float) -> tuple[list, int, np.ndarray]:
    """(layout entries, number of values, ``weight *`` the values as one row of ``slots`` complex per ciphertext).

    Complex packing: each ciphertext's values go in the real parts of its slots, then in the imaginary parts.
    """
    tensors, offset = [], 0
    for name, a in floats.items():
        tensors.append([name, list(a.shape), str(a.dtype), offset])
        offset += a.size
    flat = np.concatenate([a.ravel().astype(np.float64) for a in floats.values()])
    chunks = -(-flat.size // (2 * slots))
    z = np.zeros((chunks, 2, slots))
    z.reshape(-1)[: flat.size] = flat * weight
    return tensors, int(flat.size), z[:, 0, :] + 1j * z[:, 1, :]


def _encrypt_packed(z: np.ndarray, ctx: ts.Context) -> tuple[dict[str, Any], dict]:
    """(``{ct_key(k): c0 + seed record}``, the ciphertexts' SEAL parameters) for the rows of ``z``."""
    data: dict[str, Any] = {}
    ct_params: dict = {}
    with _SeededEncryptor(ctx) as encrypt:
        for k in range(z.shape[0]):
            ct_params, c0, seed_record = encrypt(z[k])
            data[ct_key(k)] = c0 + seed_record
    return data, ct_params


def encrypt_model(
    params: Mapping[str, Any], ctx: ts.Context, weight: float, max_clients: int = 8, *, key: str
) -> tuple[dict[str, Any], dict]:
    """Pack and encrypt ``weight * params``; returns ``(data, he_meta)`` (see the module docstring).

    ``max_clients``: how many such updates the server may add up; the range check allows for that many and the
    server refuses more. ``key``: the provisioning's key fingerprint (the site kit's ``he_key_fingerprint.txt``).
    """
    weight = _positive_weight(weight, "aggregation weight")
    max_clients = check_max_clients(max_clients, "HE encryptor")
    key = checked_fingerprint(key, "the key fingerprint given to encrypt_model")
    arrays = {name: _to_numpy(v) for name, v in params.items()}
    floats = {n: a for n, a in arrays.items() if a.dtype.kind == "f"}
    others = {n: a for n, a in arrays.items() if a.dtype.kind != "f"}
    for name, a in others.items():
        _check_plain_name(name, a.dtype)
    if not floats:
        raise ValueError("nothing to encrypt: the model has no floating-point tensors")

    slots = slot_count(ctx)
    tensors, n_values, z = _pack(floats, slots, weight)
    _check_range(z, weight, int(max_clients), ctx)
    data, ct_params = _encrypt_packed(z, ctx)
    plain = []
    for name, a in others.items():
        plain.append([name, list(a.shape), str(a.dtype)])
        data[name] = np.atleast_1d(a).astype(np.float64) * weight
    he_meta = {
        "version": FORMAT_VERSION,
        "slots": slots,
        "packing": "complex",
        "n_values": n_values,
        "chunks": len(z),
        "tensors": tensors,
        "plain": plain,
        "weight": weight,
        "contributions": 1,
        "max_clients": int(max_clients),
        "key": key,
        "level": "lowest",
        "ciphertext": ct_params,
    }
    return data, he_meta


def _check_entries(data: Any, he_meta: Mapping, what: str) -> None:
    """``data`` holds exactly the blobs and buffers ``he_meta`` declares (whose sizes are checked already)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} has missing or unexpected entries: a {type(data).__name__}, not a mapping")
    wanted = {ct_key(k) for k in range(he_meta["chunks"])} | {entry[0] for entry in he_meta["plain"]}
    if len(data) != len(wanted) or any(name not in wanted for name in data):  # the count first: it may be huge
        odd = itertools.chain((n for n in data if n not in wanted), (n for n in wanted if n not in data))
        raise ValueError(
            f"{what} has missing or unexpected entries ({len(data)} sent, {len(wanted)} declared): {brief_names(odd)}"
        )


def _check_blob_sizes(data: Mapping, chunks: int, c0_bytes: int, contributions: int) -> None:
    """Every blob is bytes of the one length its contributions give: checked before anything is built from them."""
    size = c0_bytes + contributions * SEED_RECORD_BYTES
    for k in range(chunks):
        blob = data[ct_key(k)]
        if not isinstance(blob, bytes) or len(blob) != size:
            got = f"{len(blob)} bytes" if isinstance(blob, bytes) else type(blob).__name__
            raise SealFormatError(f"ciphertext {k}: not a packed blob for {contributions} contribution(s) ({got})")


class PackedSum:
    """Running sum of packed models: c0 polynomials added modulo the ciphertext primes, seeds kept; no key.

    ``add`` checks every field against the server's own context (``ctx``, public) and key fingerprint (``key``;
    computed from ``ctx`` when not given) before it adds anything, and changes nothing when it refuses.
    """

    def __init__(self, ctx: ts.Context, key: str | None = None) -> None:
        self.key = key_fingerprint(ctx) if key is None else checked_fingerprint(key, "the server's key fingerprint")
        self.expected = expected_ciphertext(ctx)
        self.slots = slot_count(ctx)
        last = ctx.seal_context().data.last_context_data()
        self.moduli = np.array([m.value() for m in last.parms().coeff_modulus()], dtype=np.uint64)[:, None]
        self.meta: dict | None = None
        self._c0: np.ndarray | None = None  # (chunks, moduli, degree) uint64
        self._seeds: list[bytes] = []  # per ciphertext, the seed records of every contribution so far
        self._seen: set[bytes] = set()  # every seed so far: SEAL draws a fresh one per ciphertext
        self._plain: dict[str, np.ndarray] = {}

    @property
    def count(self) -> int:
        return 0 if self.meta is None else int(self.meta["contributions"])

    def add(
        self, data: Mapping[str, Any], he_meta: Mapping, sender: str | None = None, max_values: int | None = None
    ) -> None:
        """Add one update (or an aggregate) in full, or refuse it (ValueError) and change nothing.

        ``sender`` names it in the errors (the site). ``max_values``: the float values of the server's global model,
        which bounds the values (hence ciphertexts) an update may declare; ``MAX_VALUES`` when not known.
        """
        what = f"{sender}'s update" if sender else "the packed HE update"
        weight, contributions = self._check_meta(he_meta, what, max_values)
        _check_entries(data, he_meta, what)
        c0, records, fresh = self._read_blobs(data, he_meta["chunks"], contributions)
        plain = _read_plain(data, he_meta, weight)
        if self.meta is None:
            self.meta = copy.deepcopy(dict(he_meta))
            self.meta["weight"], self.meta["contributions"] = weight, contributions
            self._c0, self._seeds, self._plain = c0, records, plain
        else:
            self._commit(c0, records, plain, weight, contributions, what)
        self._seen |= fresh

    def _commit(self, c0: np.ndarray, records: list, plain: dict, weight: float, contributions: int, what: str) -> None:
        """Add a checked update: the new state is built first and swapped in, so a failure changes nothing."""
        total_weight = self.meta["weight"] + weight
        if not math.isfinite(total_weight):
            raise ValueError(f"{what}: the total weight would not be finite")
        c0 += self._c0  # < 2^61 for primes below 2^60: no overflow; c0 is this update's own array
        np.subtract(c0, self.moduli, out=c0, where=c0 >= self.moduli)
        seeds = [mine + theirs for mine, theirs in zip(self._seeds, records, strict=True)]
        plain = {name: self._plain[name] + value for name, value in plain.items()}
        self._c0, self._seeds, self._plain = c0, seeds, plain
        self.meta["weight"] = total_weight
        self.meta["contributions"] += contributions

    def _check_meta(self, he_meta: Mapping, what: str, max_values: int | None = None) -> tuple[float, int]:
        _check_format(he_meta)
        check_key(he_meta["key"], self.key, what, "the server's")
        weight, contributions, max_clients = _check_counts(he_meta)
        _check_ciphertext(he_meta["ciphertext"], self.expected, "the server's")
        _check_layout(he_meta, self.slots, max_values)
        if self.meta is not None:
            if _layout(he_meta) != _layout(self.meta):
                raise ValueError(f"{what} has a different layout (model or HE parameters differ between sites)")
            if max_clients != self.meta["max_clients"]:
                raise ValueError(
                    f"{what} allows for max_clients {max_clients}, the first update for {self.meta['max_clients']}: "
                    "set the same max_clients in every site's HE encryptor args"
                )
        if self.count + contributions > max_clients:
            raise ValueError(
                f"{what} would make {self.count + contributions} contributions, more than the max_clients "
                f"{max_clients} the sites' range check allows for: raise max_clients in the HE encryptor args "
                "of config_fed_client.json (every site alike)"
            )
        return weight, contributions

    def _read_blobs(self, data: Mapping, chunks: int, contributions: int) -> tuple[np.ndarray, list, set]:
        """(c0 of each ciphertext, its seed records, the seeds), every seed a new one and every c0 below q."""
        shape = (self.moduli.shape[0], int(self.expected["degree"]))
        c0_bytes = 8 * shape[0] * shape[1]
        _check_blob_sizes(data, chunks, c0_bytes, contributions)  # before the array they fill is allocated
        c0 = np.empty((chunks, *shape), dtype=np.uint64)
        records, fresh = [], set()
        for k in range(chunks):
            blob = data[ct_key(k)]
            c0[k] = np.frombuffer(blob, dtype="<u8", count=shape[0] * shape[1]).reshape(shape)
            for j in range(contributions):
                seed = _seed(blob, c0_bytes + j * SEED_RECORD_BYTES, f"ciphertext {k}: seed record {j}")
                if seed in fresh or seed in self._seen:
                    raise SealFormatError(
                        f"ciphertext {k}: seed record {j} repeats a seed (a replayed ciphertext): SEAL draws a "
                        "fresh seed for every ciphertext"
                    )
                fresh.add(seed)
            records.append(blob[c0_bytes:])
        if np.any(c0 >= self.moduli):
            raise SealFormatError("ciphertext coefficients outside the modulus")
        return c0, records, fresh

    def result(self) -> tuple[dict[str, Any], dict]:
        if self.meta is None or self._c0 is None:
            raise ValueError("no packed HE update to aggregate")
        c0 = self._c0.astype("<u8", copy=False)
        data: dict[str, Any] = {ct_key(k): c0[k].tobytes() + seeds for k, seeds in enumerate(self._seeds)}
        data.update({name: value.copy() for name, value in self._plain.items()})
        return data, copy.deepcopy(self.meta)


def decrypt_model(
    data: Mapping[str, Any], he_meta: Mapping, ctx: ts.Context, *, key: str, max_values: int | None = None
) -> dict[str, np.ndarray]:
    """Decrypt a packed model with the secret key and divide by its total weight: ``{name: array}``.

    ``key``: this site's key fingerprint (its kit's ``he_key_fingerprint.txt``); a model under another key would
    decrypt to garbage, so it is refused. Every field and size is checked (``max_values`` bounds the values, as at
    the server) before the first ciphertext is decrypted: the model comes from the server.
    """
    if not ctx.is_private():
        raise ValueError("decrypting needs the secret key (client_context.tenseal), this context is public")
    _check_format(he_meta)
    check_key(
        he_meta["key"], checked_fingerprint(key, "this site's key fingerprint"), "the packed HE model", "this site's"
    )
    divisor, contributions, _ = _check_counts(he_meta)
    expected = expected_ciphertext(ctx)
    _check_ciphertext(he_meta["ciphertext"], expected, "this site's")
    _check_layout(he_meta, slot_count(ctx), max_values)
    _check_entries(data, he_meta, "the packed HE model")
    _check_blob_sizes(data, he_meta["chunks"], 8 * expected["degree"] * expected["moduli"], contributions)
    plain = _read_plain(data, he_meta, divisor)
    flat = _decrypt_values(data, he_meta, ctx)[: he_meta["n_values"]] / divisor
    out: dict[str, np.ndarray] = {}
    for name, shape, dtype, offset in he_meta["tensors"]:
        size = math.prod(shape)
        out[name] = flat[offset : offset + size].reshape(shape).astype(dtype)
    for name, shape, dtype in he_meta["plain"]:
        out[name] = np.rint(plain[name] / divisor).astype(dtype).reshape(shape)
    return out


def _decrypt_values(data: Mapping[str, Any], he_meta: Mapping, ctx: ts.Context) -> np.ndarray:
    """Every ciphertext's values, real parts then imaginary parts: ``chunks x 2 x slots`` float64."""
    seal_context = ctx.seal_context().data
    decryptor = sealapi.Decryptor(seal_context, ctx.secret_key().data)
    encoder = sealapi.CKKSEncoder(seal_context)
    slots = int(he_meta["slots"])
    values = np.empty((he_meta["chunks"], 2, slots))
    with _Rebuilder(ctx, he_meta) as rebuild:
        for k in range(he_meta["chunks"]):
            plain = sealapi.Plaintext()
            decryptor.decrypt(rebuild(data[ct_key(k)]), plain)
            z = np.array(encoder.decode_complex(plain), dtype=complex)
            values[k, 0], values[k, 1] = z.real, z.imag
    return values.reshape(-1)


def as_ckks_vector(blob: bytes, he_meta: Mapping, ctx: ts.Context) -> ts.CKKSVector:
    """One blob as a TenSEAL CKKSVector under ``ctx`` (public or secret), to inspect it with TenSEAL.

    TenSEAL decrypts the real parts only: the first half of the blob's values.
    """
    _check_format(he_meta)
    _check_counts(he_meta)
    with _Rebuilder(ctx, he_meta) as rebuild:
        rebuild(blob).save(rebuild.path)
        seal_bytes = rebuild.read()
    return ts.ckks_vector_from(
        ctx, ckks_vector_bytes(seal_bytes, int(he_meta["slots"]), he_meta["ciphertext"]["scale"])
    )


def packed_bytes(data: Mapping[str, Any]) -> int:
    """Payload bytes of a packed model: ciphertexts plus plaintext integer tensors."""
    return sum(len(v) if isinstance(v, bytes) else np.asarray(v).nbytes for v in data.values())
