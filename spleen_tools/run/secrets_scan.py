"""Scan what a secure HE run left behind for secrets that must never leave the startup kits.

The run directory, the MLflow store and artifacts, a downloaded job and the logs may hold no private key, no TenSEAL
context with its secret key and no admin credential. known_secrets() reads those secrets from a provisioning output
(``startup/`` kits and ``state/cert.json``) as byte needles: chunks of the private part of each key (DER, and as
base64 so a re-wrapped or JSON-escaped PEM copy is still found) and chunks of the HE secret key (SEAL bytes as
written and decompressed). scan() walks the folders (no symlinks, into .zip files) in overlapping chunks and flags any
PEM private key marker, any file that loads as a TenSEAL context with a secret key, and any needle.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import tenseal
import zstandard
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

CHUNK_SIZE = 8 << 20
_OVERLAP = 256  # bytes carried into the next chunk: more than any needle or PEM marker
_WHOLE_CAP = 256 << 20  # largest file loaded whole (a TenSEAL context, a zip inside a zip)
_KIT_FILE_CAP = 16 << 20
_ZIP_DEPTH = 3
_DER_CHUNK = 24  # bytes; 32 base64 characters, half a PEM line
_HE_CHUNK = 32
_PER_FORM = 12  # needles per secret and form
_KIT_DIRS = {"startup", "state"}  # where nvflare provision writes keys and contexts

_PEM_MARKER = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compression, reserved, size
_SEAL_MAGIC = 0xA15E
_GRAM = 8
_TABLE_BITS = 20  # 1 MiB table: stays in cache
_HASH = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Secret:
    """One thing that must not leak: where it is provisioned and the byte strings that give a copy away."""

    name: str  # "<file>: <kind>"
    sources: tuple[Path, ...]  # the provisioned files holding it; they are not findings
    needles: tuple[bytes, ...]


class Finding(NamedTuple):
    file: str  # a path, or "archive.zip!member"
    what: str
    detail: str


@dataclass
class ScanReport:
    files: int = 0
    bytes: int = 0
    members: int = 0  # files read inside zips
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[Finding] = field(default_factory=list)  # could not be read or unpacked
    kit_files: list[str] = field(default_factory=list)  # provisioned secret files met on the way, skipped

    @property
    def clean(self) -> bool:
        return not self.findings and not self.unchecked


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
    if path.suffix == ".tenseal" or _looks_like_context(data):
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
    """Chunks over the key's private numbers (DER, and base64 in each PEM form) and the key's public encoding.

    Headers and algorithm ids are the same in every key, and the public numbers are in the certificate: a chunk
    counts only if most of it is private (RSA d, p, q, ...; the EC private value).
    """
    key = _load_key(der)
    forms, public, pieces = [der], [], [der]  # unreadable (encrypted) key: any chunk
    if key is not None:
        public.append(key.public_key().public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo))
        pieces = _private_pieces(key) or [der]
        for fmt in (ser.PrivateFormat.PKCS8, ser.PrivateFormat.TraditionalOpenSSL):  # the same key re-exported
            try:
                forms.append(key.private_bytes(ser.Encoding.DER, fmt, ser.NoEncryption()))
            except ValueError:
                pass
    needles: list[bytes] = []
    for n, form in enumerate(dict.fromkeys(forms)):
        b64 = base64.b64encode(form)
        private = [(start, start + len(p)) for p in pieces if (start := form.find(p)) >= 0]
        starts = [i for i in range(0, len(form) - _DER_CHUNK + 1, _DER_CHUNK) if _mostly_in(i, private)]
        if n == 0:  # the private numbers are the same bytes in every form
            needles += [form[i : i + _DER_CHUNK] for i in _spread(starts)]
        needles += [b64[i // 3 * 4 : i // 3 * 4 + _DER_CHUNK // 3 * 4] for i in _spread(starts)]
    return needles, public


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


def _mostly_in(start: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether at least 2/3 of the chunk at ``start`` lies in one of the ranges."""
    end = start + _DER_CHUNK
    return any(min(end, hi) - max(start, lo) >= _DER_CHUNK * 2 // 3 for lo, hi in ranges)


def _spread(items: list[int]) -> list[int]:
    step = max(1, len(items) // _PER_FORM)
    return items[::step][:_PER_FORM]


def _key_bytes_needles(key: bytes) -> list[bytes]:
    """Chunks of the secret key's SEAL bytes as saved (past the header) and of its decompressed body."""
    forms = [(key, 64)]
    body = _seal_body(key)
    if body is not None:
        forms.append((body, 256))  # past parms_id and headers, which public objects share
    needles = []
    for data, start in forms:
        starts = list(range(start, len(data) - _HE_CHUNK, _HE_CHUNK))
        needles += [data[i : i + _HE_CHUNK] for i in _spread(starts)]
    return needles


def _seal_body(obj: bytes) -> bytes | None:
    """A SEAL object's body, decompressed (compr mode 1: zlib, 2: zstd), or None if it is not one."""
    if len(obj) < _SEAL_HEADER.size:
        return None
    magic, hsize, _, _, compr, _, _ = _SEAL_HEADER.unpack_from(obj)
    if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size:
        return None
    body = obj[hsize:]
    try:
        if compr == 2:
            return zstandard.ZstdDecompressor().decompressobj().decompress(body)
        return zlib.decompress(body) if compr == 1 else body
    except (zlib.error, zstandard.ZstdError):
        return None


def _looks_like_context(head: bytes) -> bool:
    """A TenSEAL context proto starts with field 1 (length-delimited): the SEAL encryption parameters."""
    if len(head) < 2 + _SEAL_HEADER.size or head[0] != 0x0A:
        return False
    size, i = 0, 1
    for shift in range(0, 35, 7):
        size |= (head[i] & 0x7F) << shift
        i += 1
        if not head[i - 1] & 0x80:
            break
    if len(head) < i + _SEAL_HEADER.size:
        return False
    magic, hsize, _, _, _, _, total = _SEAL_HEADER.unpack_from(head, i)
    return magic == _SEAL_MAGIC and hsize == _SEAL_HEADER.size and total == size


def _private_context(data: bytes) -> tenseal.Context | None:
    """``data`` as a TenSEAL context, if it loads as one and holds the secret key."""
    try:
        ctx = tenseal.context_from(data)
    except Exception:  # TenSEAL raises plain exceptions on anything that is not a context
        return None
    return ctx if ctx.is_private() else None


def _secret_key_bytes(data: bytes) -> bytes | None:
    """The SEAL serialization of the secret key when ``data`` is a TenSEAL context that holds one."""
    ctx = _private_context(data)
    if ctx is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:  # mode 0700, gone on return: SEAL saves to paths only
        path = Path(tmp, "secret_key")
        ctx.secret_key().data.save(str(path))
        return path.read_bytes()


# --- the scan -----------------------------------------------------------------------------------------------------


def scan(roots: list[Path], secrets: list[Secret], *, chunk_size: int = CHUNK_SIZE) -> ScanReport:
    """Every regular file under the roots (symlinks not followed, .zip files opened), read in overlapping chunks.

    The secrets' own provisioned files are skipped (listed in ``kit_files``); a missing root raises
    FileNotFoundError.
    """
    missing = [root for root in roots if not root.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such file or folder")
    scanner = _Scanner(secrets, chunk_size)
    kit = {_file_id(p) for s in secrets for p in s.sources if p.exists()}
    for path, file_id in _files(roots, scanner.report):
        if file_id in kit:
            scanner.report.kit_files.append(str(path))
            continue
        scanner.file(path)
    return scanner.report


def _file_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _files(roots: list[Path], report: ScanReport) -> Iterator[tuple[Path, tuple[int, int]]]:
    """Regular files, each once; symlinks (which may lead out of the roots), fifos and sockets are passed over."""
    seen: set[tuple[int, int]] = set()

    def unreadable(err: OSError) -> None:
        report.unchecked.append(Finding(str(err.filename), "not checked", err.strerror or str(err)))

    for root in roots:
        if not root.is_dir():  # a file named on purpose: read it even through a symlink
            root = root.resolve()
        walk = os.walk(root, onerror=unreadable) if root.is_dir() else [(str(root.parent), [], [root.name])]
        for dirpath, dirnames, filenames in walk:
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                try:
                    st = path.lstat()
                except OSError as e:
                    unreadable(e)
                    continue
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    yield path, (st.st_dev, st.st_ino)


class _NeedleIndex:
    """Needles by their 8-byte grams: one vectorised hash look-up per 8 bytes of data, whatever the needle count.

    A needle of 15 bytes or more holds a whole gram at a multiple of 8 wherever it lies, so grams of the data at
    offsets 0, 8, 16, ... are enough; a hit is then compared byte for byte.
    """

    def __init__(self, secrets: list[Secret]) -> None:
        self.by_gram: dict[int, list[tuple[bytes, int, Secret]]] = {}
        for secret in secrets:
            for needle in secret.needles:
                if not 2 * _GRAM - 1 <= len(needle) <= _OVERLAP:
                    raise ValueError(f"{secret.name}: needle of {len(needle)} bytes")
                for off in range(len(needle) - _GRAM + 1):
                    gram = int.from_bytes(needle[off : off + _GRAM], "little")
                    self.by_gram.setdefault(gram, []).append((needle, off, secret))
        self.table = np.zeros(1 << _TABLE_BITS, dtype=bool)
        self.table[_hash(np.fromiter(self.by_gram, dtype=np.uint64, count=len(self.by_gram)))] = True

    def hits(self, buf: bytes) -> Iterator[tuple[int, Secret]]:
        """(offset in buf, secret) of every needle in buf."""
        if not self.by_gram:
            return
        grams = np.frombuffer(buf, dtype="<u8", count=len(buf) // _GRAM)
        cand = np.flatnonzero(self.table[_hash(grams)])
        values = grams[cand]
        known = [v for v in np.unique(values).tolist() if v in self.by_gram]  # drops hash collisions at once
        for i in cand[np.isin(values, np.array(known, dtype=np.uint64))].tolist():
            for needle, off, secret in self.by_gram[int(grams[i])]:
                start = _GRAM * i - off
                if start >= 0 and buf[start : start + len(needle)] == needle:
                    yield start, secret


def _hash(grams: np.ndarray) -> np.ndarray:
    return (grams * _HASH) >> np.uint64(64 - _TABLE_BITS)


class _Scanner:
    def __init__(self, secrets: list[Secret], chunk_size: int) -> None:
        if chunk_size <= _OVERLAP:
            raise ValueError(f"chunk_size must exceed {_OVERLAP} bytes")
        self.index = _NeedleIndex(secrets)
        self.chunk_size = chunk_size
        self.report = ScanReport()

    def file(self, path: Path) -> None:
        try:
            with path.open("rb") as f:
                self.report.bytes += self.stream(f, str(path), depth=0)
            self.report.files += 1
        except OSError as e:
            self.report.unchecked.append(Finding(str(path), "not checked", e.strerror or str(e)))

    def stream(self, f: BinaryIO, label: str, depth: int) -> int:
        """Scan one file or zip member (seekable); returns its size."""
        head = f.read(64)
        f.seek(0)
        if label.endswith(".tenseal") or _looks_like_context(head):
            self.context(f, label)
            f.seek(0)
        size = self.raw(f, label)
        if head.startswith(b"PK\x03\x04") and depth < _ZIP_DEPTH:
            f.seek(0)
            self.archive(f if depth == 0 else self.load(f, label), label, depth)
        return size

    def raw(self, f: BinaryIO, label: str) -> int:
        """PEM markers and needles, in chunks that overlap so nothing across a chunk border is missed."""
        seen: set[str] = set()
        tail, offset = b"", 0
        while block := f.read(self.chunk_size):
            buf, base = tail + block, offset - len(tail)
            for m in _PEM_MARKER.finditer(buf):
                self.found(seen, label, "PEM private key", f"{m.group().decode()} at byte {base + m.start()}")
            for start, secret in self.index.hits(buf):
                self.found(seen, label, f"copy of {secret.name}", f"at byte {base + start}")
            offset += len(block)
            tail = buf[-_OVERLAP:]
        return offset

    def context(self, f: BinaryIO, label: str) -> None:
        data = f.read(_WHOLE_CAP + 1)
        if len(data) > _WHOLE_CAP:
            self.report.unchecked.append(Finding(label, "not loaded as a TenSEAL context", "too large"))
        elif _private_context(data) is not None:
            self.found(set(), label, "TenSEAL context with secret key", "tenseal.context_from(...).is_private()")

    def archive(self, f: BinaryIO | None, label: str, depth: int) -> None:
        if f is None:
            return
        try:
            with zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    name = f"{label}!{info.filename}"
                    try:
                        with zf.open(info) as member:
                            self.stream(member, name, depth + 1)
                        self.report.members += 1
                    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, zlib.error, EOFError) as e:
                        self.report.unchecked.append(Finding(name, "zip member not checked", str(e)))
        except zipfile.BadZipFile as e:
            self.report.unchecked.append(Finding(label, "zip not opened", str(e)))

    def load(self, f: BinaryIO, label: str) -> BinaryIO | None:
        """A zip inside a zip, in memory: zipfile seeks, and seeking back in a compressed member re-reads it."""
        data = f.read(_WHOLE_CAP + 1)
        if len(data) <= _WHOLE_CAP:
            return io.BytesIO(data)
        self.report.unchecked.append(Finding(label, "zip inside a zip not opened", "too large"))
        return None

    def found(self, seen: set[str], label: str, what: str, detail: str) -> None:
        if what not in seen:  # one finding per file and kind
            seen.add(what)
            self.report.findings.append(Finding(label, what, detail))
