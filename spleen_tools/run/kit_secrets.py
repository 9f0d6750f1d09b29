"""What must never leave the startup kits, as byte needles to look for: read from a provisioning output.

Chunks of the private part of each key and of the HE secret key (SEAL bytes as written and decompressed), each as
bytes, hex and base64 at every byte alignment; needles that also occur in a public kit file (certificates, public
contexts) are dropped. ``secrets_scan`` looks for them, in data with its layout taken out (line breaks, UTF-16).
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import tenseal
import zstandard
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from spleen_flare.he.seal_format import SEAL_HEADER, SEAL_MAGIC, SealFormatError, seal_body

_KIT_FILE_CAP = 16 << 20
_DER_CHUNK = 32  # bytes; 40 base64 characters at any alignment, less than a PEM line
_HE_CHUNK = 64  # bytes; the decompressed key has zero bytes in every coefficient, which normalizing drops
_PER_FORM = 12  # chunks per secret and form, each re-encoded 6 ways
_KIT_DIRS = {"startup", "state"}  # where nvflare provision writes keys and contexts
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)
T = TypeVar("T")


@dataclass(frozen=True)
class Secret:
    """One thing that must not leak: where it is provisioned and the byte strings that give a copy away."""

    name: str  # "<file>: <kind>"
    sources: tuple[Path, ...]  # the provisioned files holding it; they are not findings
    needles: tuple[bytes, ...]


# --- what must not leak -------------------------------------------------------------------------------------------


def known_secrets(provisioning_dirs: list[Path]) -> list[Secret]:
    """Private keys and secret TenSEAL contexts under the ``startup/`` and ``state/`` folders of these dirs."""
    found: list[tuple[str, Path, list[bytes]]] = []
    public: list[bytes] = []  # certificates, public contexts: needles found in them would be false alarms
    for root in provisioning_dirs:
        for path in _kit_files(root):
            data = path.read_bytes()
            secrets = _file_secrets(path, data, public)
            found += [(f"{path}: {kind}", path, needles) for kind, needles in secrets]
            if not secrets:
                public.append(data)
    merged: dict[tuple[bytes, ...], Secret] = {}
    for name, source, needles in found:
        kept = tuple(n for n in dict.fromkeys(needles) if not any(n in blob for blob in public))
        group = kept or (name.encode(),)  # no needle left: its own group (still skipped as a source)
        if group in merged:  # the same key or context provisioned twice (prod_00 and prod_01, every site)
            merged[group] = Secret(merged[group].name, (*merged[group].sources, source), kept)
        else:
            merged[group] = Secret(name, (source,), kept)
    return list(merged.values())


def _kit_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if Path(dirpath).name in _KIT_DIRS:
            for name in sorted(filenames):
                path = Path(dirpath, name)
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_size <= _KIT_FILE_CAP:
                    yield path


def _file_secrets(path: Path, data: bytes, public: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """(kind, needles) for each secret in one kit file; public forms of its keys go to ``public``."""
    secrets = []
    for label, der in _pem_blocks(data):
        if not label.endswith(b"PRIVATE KEY"):
            public.append(der)  # a certificate
            continue
        needles, key_public = _key_needles(der)
        public += key_public
        where = f" ({key})" if (key := _json_label(data, der)) else ""
        secrets.append((f"PEM private key{where}", needles))
    if path.suffix == ".tenseal" or looks_like_context(data):
        key = _secret_key_bytes(data)
        if key is not None:
            secrets.append(("TenSEAL context with secret key", _key_bytes_needles(key)))
    return secrets


def _pem_texts(data: bytes) -> list[bytes]:
    """The file, or the strings in it when it is JSON (state/cert.json keeps PEM keys with escaped newlines)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return [data]
    texts, stack = [], [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str):
            texts.append(item.encode())
    return texts


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    blocks = []
    for text in _pem_texts(data):
        for m in _PEM_BLOCK.finditer(text):
            body = m.group(2).replace(b"\r", b"").split(b"\n\n")[-1]  # past Proc-Type headers, if any
            try:
                blocks.append((m.group(1), base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", body) + b"==")))
            except ValueError:
                continue
    return blocks


def _json_label(data: bytes, der: bytes) -> str:
    """The JSON key holding this key in a state/cert.json-like file ("root_pri_key", "site-1.pri_key"), or ""."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return ""
    stack: list[tuple[str, object]] = [("", doc)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            stack += [(f"{where}.{k}".lstrip("."), v) for k, v in item.items()]
        elif isinstance(item, str) and any(d == der for _, d in _pem_blocks(item.encode())):
            return where
    return ""


def _key_needles(der: bytes) -> tuple[list[bytes], list[bytes]]:
    """Chunks of the key's private numbers, re-encoded (``_reencoded``), and the key's public encoding.

    Headers and algorithm ids are the same in every key, and the public numbers are in the certificate: the chunks
    lie wholly inside the private numbers (RSA d, p, q, ...; the EC private value), which every DER form of the key
    (PKCS#1, PKCS#8, SEC1) holds as the same bytes.
    """
    key = _load_key(der)
    public, pieces = [], [der]  # unreadable (encrypted) key: any chunk
    if key is not None:
        public.append(key.public_key().public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo))
        pieces = _private_pieces(key) or [der]
    starts = [(p, i) for p in pieces for i in range(0, max(1, len(p) - _DER_CHUNK + 1), _DER_CHUNK)]  # short: whole
    chunks = [p[i : i + _DER_CHUNK] for p, i in starts]
    return [needle for chunk in _spread(chunks) for needle in _reencoded(chunk)], public


def _reencoded(chunk: bytes) -> list[bytes]:
    """The chunk as bytes, as hex (lower and upper case) and as base64 at each of the 3 byte alignments it may have
    in a longer base64 text (a copy shifted by 1 or 2 bytes encodes to other letters): only the 3-byte groups wholly
    inside the chunk, which encode the same whatever surrounds them."""
    b64 = [base64.b64encode(chunk[a : a + (len(chunk) - a) // 3 * 3]) for a in range(3)]
    return [chunk, chunk.hex().encode(), chunk.hex().upper().encode(), *b64]


def _load_key(der: bytes) -> PrivateKeyTypes | None:
    try:
        return ser.load_der_private_key(der, password=None)
    except (ValueError, TypeError):  # encrypted, or not a key
        return None


def _private_pieces(key: PrivateKeyTypes) -> list[bytes]:
    numbers = key.private_numbers() if hasattr(key, "private_numbers") else None
    if isinstance(numbers, rsa.RSAPrivateNumbers):
        ints = [numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp]
    elif isinstance(numbers, ec.EllipticCurvePrivateNumbers):
        ints = [numbers.private_value]
    else:  # Ed25519 and the like, or [] (then any chunk counts)
        try:
            return [key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())]
        except ValueError:
            return []
    return [i.to_bytes((i.bit_length() + 7) // 8, "big") for i in ints]


def _spread(items: list[T]) -> list[T]:
    step = max(1, len(items) // _PER_FORM)
    return items[::step][:_PER_FORM]


def _key_bytes_needles(key: bytes) -> list[bytes]:
    """Chunks of the secret key's SEAL bytes as saved (past the header) and of its decompressed body, re-encoded."""
    forms = [(key, 64)]
    body = _seal_body(key)
    if body is not None:
        forms.append((body, 256))  # past parms_id and headers, which public objects share
    needles = []
    for data, start in forms:
        starts = list(range(start, len(data) - _HE_CHUNK, _HE_CHUNK))
        needles += [needle for i in _spread(starts) for needle in _reencoded(data[i : i + _HE_CHUNK])]
    return needles


def _seal_body(obj: bytes) -> bytes | None:
    """A SEAL object's members, decompressed, or None if it is not one."""
    try:
        return seal_body(obj)[1]
    except (SealFormatError, zlib.error, zstandard.ZstdError):
        return None


def looks_like_context(head: bytes) -> bool:
    """A TenSEAL context proto starts with field 1 (length-delimited): the SEAL encryption parameters."""
    if len(head) < 2 + SEAL_HEADER.size or head[0] != 0x0A:
        return False
    size, i = 0, 1
    for shift in range(0, 35, 7):
        size |= (head[i] & 0x7F) << shift
        i += 1
        if not head[i - 1] & 0x80:
            break
    if len(head) < i + SEAL_HEADER.size:
        return False
    magic, hsize, _, _, _, _, total = SEAL_HEADER.unpack_from(head, i)
    return magic == SEAL_MAGIC and hsize == SEAL_HEADER.size and total == size


def private_context(data: bytes) -> tenseal.Context | None:
    """``data`` as a TenSEAL context, if it loads as one and holds the secret key."""
    try:
        ctx = tenseal.context_from(data)
    except Exception:  # TenSEAL raises plain exceptions on anything that is not a context
        return None
    return ctx if ctx.is_private() else None


def _secret_key_bytes(data: bytes) -> bytes | None:
    """The SEAL serialization of the secret key when ``data`` is a TenSEAL context that holds one."""
    ctx = private_context(data)
    if ctx is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:  # mode 0700, gone on return: SEAL saves to paths only
        path = Path(tmp, "secret_key")
        ctx.secret_key().data.save(str(path))
        return path.read_bytes()
