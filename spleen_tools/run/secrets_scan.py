"""Scan what a secure HE run left behind for secrets that must never leave the startup kits.

The run directory, the MLflow store and artifacts, a downloaded job and the logs may hold no private key, no TenSEAL
context with its secret key and no admin credential. ``kit_secrets.known_secrets()`` reads those secrets from a
provisioning output as byte needles; scan() walks the folders (no symlinks, into .zip files) in overlapping chunks
and flags any PEM private key marker, any file that loads as a TenSEAL context with a secret key, and any needle.
"""

from __future__ import annotations

import io
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from spleen_tools.run.kit_secrets import Secret, looks_like_context, private_context

CHUNK_SIZE = 8 << 20
_OVERLAP = 256  # bytes carried into the next chunk: more than any needle or PEM marker
_WHOLE_CAP = 256 << 20  # largest file loaded whole (a TenSEAL context, a zip inside a zip)
_ZIP_DEPTH = 3

_PEM_MARKER = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_GRAM = 8
_TABLE_BITS = 20  # 1 MiB table: stays in cache
_HASH = np.uint64(0x9E3779B97F4A7C15)


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
        if label.endswith(".tenseal") or looks_like_context(head):
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
        elif private_context(data) is not None:
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
