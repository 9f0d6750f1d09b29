"""SEAL 4's serialization layout, read and written by hand: header, Ciphertext members, DynArray, PRNG info.

Why: TenSEAL's Python API cannot encrypt at a chosen level or expose the seed of a ciphertext's random half, so
the packed format (``spleen_flare.he.packing``) goes through TenSEAL's bundled SEAL API (``tenseal.sealapi``),
which only saves to and loads from paths, and splits and joins the saved bytes itself: a seeded ciphertext is its
``c0`` polynomial plus an 81-byte seed record. The bytes follow SEAL 4's documented layout; anything else is a
:class:`SealFormatError`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import tenseal.sealapi as sealapi
import zstandard

SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compression, reserved, total size
SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
_MEMBERS = struct.Struct("<32sBQQQdQ")  # parms_id, is_ntt_form, size, poly degree, moduli, scale, correction
SEED_RECORD_BYTES = SEAL_HEADER.size + 1 + 64  # a saved UniformRandomGeneratorInfo: header, PRNG type, 512-bit seed
_PRNG_TYPES = (1, 2)  # SEAL's prng_type: blake2xb, shake256


class SealFormatError(ValueError):
    """Bytes that are not the SEAL ciphertext layout this module reads and writes."""


def _header(total: int, version: tuple[int, int]) -> bytes:
    return SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER.size, version[0], version[1], _COMPR_NONE, 0, total)


def seal_body(saved: bytes) -> tuple[tuple[int, int], bytes]:
    """A saved SEAL object -> (SEAL version, its members uncompressed)."""
    if len(saved) < SEAL_HEADER.size:
        raise SealFormatError("not a SEAL object")
    magic, hsize, major, minor, compr, _, total = SEAL_HEADER.unpack_from(saved)
    if magic != SEAL_MAGIC or hsize != SEAL_HEADER.size or total != len(saved):
        raise SealFormatError("not a SEAL object")
    body = saved[SEAL_HEADER.size :]
    if compr == _COMPR_ZSTD:
        body = zstandard.ZstdDecompressor().decompress(body, max_output_size=64 * len(saved))
    elif compr == _COMPR_ZLIB:
        body = zlib.decompress(body)
    elif compr != _COMPR_NONE:
        raise SealFormatError(f"SEAL compression mode {compr} is not supported")
    return (major, minor), body


def _split_seeded(seal_bytes: bytes) -> tuple[dict, bytes, bytes]:
    """A saved seeded ciphertext -> (its SEAL parameters, c0 bytes, the 81-byte seed record)."""
    (major, minor), body = seal_body(seal_bytes)
    parms_id, ntt, size, degree, moduli, scale, correction = _MEMBERS.unpack_from(body)
    offset = _MEMBERS.size
    magic, _, _, _, _, _, dyn_total = SEAL_HEADER.unpack_from(body, offset)
    (count,) = struct.unpack_from("<Q", body, offset + SEAL_HEADER.size)
    c0_start = offset + SEAL_HEADER.size + 8
    c0_end = c0_start + 8 * count
    layout_ok = magic == SEAL_MAGIC and dyn_total == c0_end - offset and len(body) == c0_end + SEED_RECORD_BYTES
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
        + _header(SEAL_HEADER.size + len(dyn), version)
        + dyn
        + seed_record
    )
    return _header(SEAL_HEADER.size + len(members), version) + members


def _seed(blob: bytes, offset: int, where: str) -> bytes:
    """The 64-byte seed of the SEAL PRNG record at ``offset``."""
    magic, hsize, _, _, compr, _, total = SEAL_HEADER.unpack_from(blob, offset)
    prng_type = blob[offset + SEAL_HEADER.size]
    if (magic, hsize, compr, total) != (SEAL_MAGIC, SEAL_HEADER.size, _COMPR_NONE, SEED_RECORD_BYTES) or (
        prng_type not in _PRNG_TYPES
    ):
        raise SealFormatError(f"{where} is not a SEAL seed record")
    return blob[offset + SEAL_HEADER.size + 1 : offset + SEED_RECORD_BYTES]


def _parms_id_hex(parms_id: list[int]) -> str:
    return struct.pack("<4Q", *parms_id).hex()


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


def _saved(seal_object: Any) -> bytes:
    """What SEAL's ``save`` writes for ``seal_object`` (sealapi only saves to paths)."""
    with _SealFile() as f:
        seal_object.save(f.path)
        return f.read()


@functools.cache
def seal_version() -> tuple[int, int]:
    """The SEAL version this process writes (the header of any saved object)."""
    return seal_body(_saved(sealapi.Plaintext()))[0]


# -- TenSEAL's CKKSVector protobuf, around one SEAL ciphertext ------------------------------------------------------
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
