"""Scan what a secure HE run left behind for secrets that must never leave the startup kits.

The run directory, the MLflow store and artifacts, a downloaded job and the logs may hold no private key, no TenSEAL
context with its secret key and no admin credential. ``kit_secrets.known_secrets()`` reads those secrets from a
provisioning output as byte needles; scan() walks the folders (no symlinks) and reads every file in overlapping
chunks, looking for PEM private key markers and the needles in the bytes with their layout taken out (any line
width, UTF-16, hex separators: ``scan_text``), and for files that load as a TenSEAL context with a
secret key. Compressed files and archives (gzip, bzip2, xz, zstd, tar, zip; nested) are scanned as they are and
unpacked, each unpacked stream capped; a file that cannot be read or unpacked in full is reported as not checked,
which fails the scan like a finding.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

from spleen_tools.run import scan_decoders as dec
from spleen_tools.run.kit_secrets import Secret, looks_like_context, private_context
from spleen_tools.run.scan_text import OVERLAP, ChunkScan, NeedleIndex

CHUNK_SIZE = 8 << 20
MEMBER_CAP = 1 << 30  # the most one compressed stream or archive member may unpack to
FILE_CAP = 4 << 30  # the most all streams unpacked from one file on disk may give, at every level together
MAX_DEPTH = 5  # archives inside archives (a .tar.gz is two)
_WHOLE_CAP = 256 << 20  # largest stream loaded whole (a TenSEAL context, a zip inside an archive)
_HELD_CAP = 512 << 20  # all such loads held at once
_ZIP_DIRECTORY_CAP = 16 << 20  # zipfile holds an object per entry: about 10x this in memory
_HEAD = 512  # enough to tell an archive (tar's magic is at byte 257)
_UNPACK_IT = "unpack it and scan the files"


class Finding(NamedTuple):
    file: str  # a path, or "archive.tar.gz!archive.tar!member"
    what: str
    detail: str


@dataclass
class ScanReport:
    files: int = 0
    bytes: int = 0
    members: int = 0  # streams read inside compressed files and archives
    unpacked: int = 0  # bytes read out of them
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[Finding] = field(default_factory=list)  # could not be read or unpacked in full
    kit_files: list[str] = field(default_factory=list)  # provisioned secret files met on the way, skipped

    @property
    def clean(self) -> bool:
        return not self.findings and not self.unchecked


# --- the scan -----------------------------------------------------------------------------------------------------


def scan(
    roots: list[Path],
    secrets: list[Secret],
    *,
    chunk_size: int = CHUNK_SIZE,
    member_cap: int = MEMBER_CAP,
    file_cap: int = FILE_CAP,
) -> ScanReport:
    """Every regular file under the roots (symlinks not followed, archives opened), read in overlapping chunks.

    The secrets' own provisioned files are skipped at their provisioned paths only (listed in ``kit_files``): a
    hard link or a copy anywhere else is a finding. A missing root raises FileNotFoundError.
    """
    missing = [root for root in roots if not root.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such file or folder")
    scanner = _Scanner(secrets, chunk_size, member_cap, file_cap)
    kit = {os.path.realpath(p) for s in secrets for p in s.sources}
    for path, real in _files(roots, scanner.report):
        if real in kit:
            scanner.report.kit_files.append(str(path))
        else:
            scanner.file(path)
    return scanner.report


def _files(roots: list[Path], report: ScanReport) -> Iterator[tuple[Path, str]]:
    """(path, real path) of regular files, each path once; symlinks (which may lead out of the roots), fifos and
    sockets are passed over. Hard links are read at each of their paths."""
    seen: set[str] = set()

    def unreadable(err: OSError) -> None:
        report.unchecked.append(Finding(str(err.filename), "not checked", err.strerror or str(err)))

    for root in roots:
        if not root.is_dir():  # a file named on purpose: read it even through a symlink
            root = root.resolve()
        walk = os.walk(root, onerror=unreadable) if root.is_dir() else [(str(root.parent), [], [root.name])]
        for dirpath, dirnames, filenames in walk:
            dirnames.sort()
            real_dir = os.path.realpath(dirpath)
            for name in sorted(filenames):
                path, real = Path(dirpath, name), os.path.join(real_dir, name)
                try:
                    st = path.lstat()
                except OSError as e:
                    unreadable(e)
                    continue
                if stat.S_ISREG(st.st_mode) and real not in seen:
                    seen.add(real)
                    yield path, real


class _Scanner:
    def __init__(self, secrets: list[Secret], chunk_size: int, member_cap: int, file_cap: int) -> None:
        if chunk_size <= OVERLAP:
            raise ValueError(f"chunk_size must exceed {OVERLAP} bytes")
        self.index = NeedleIndex(secrets)
        self.chunk_size, self.member_cap, self.file_cap = chunk_size, member_cap, file_cap
        self.held = 0  # bytes of zips inside archives loaded whole, now
        self.report = ScanReport()

    def file(self, path: Path) -> None:
        budget = dec.Budget(self.file_cap)
        try:
            with path.open("rb") as f:
                self.report.bytes += self.stream(f, str(path), 0, budget)
            self.report.files += 1
        except OSError as e:
            self.unchecked(str(path), "not checked", e.strerror or str(e))
        except dec.TooLarge as e:  # the file's budget: its members' own caps are handled where they are read
            self.unchecked(str(path), "not fully scanned", f"{e}; {_UNPACK_IT}, or raise --max-unpacked")
        self.report.unpacked += budget.limit - budget.left

    def stream(self, f: BinaryIO, label: str, depth: int, budget: dec.Budget) -> int:
        """Scan one file or unpacked stream; returns its size."""
        if f.seekable():
            head = f.read(_HEAD)
            f.seek(0)
        else:
            head = _read_up_to(f, _HEAD)
            f = dec.Replay(f, head)
        kind = dec.archive_kind(head)
        if looks_like_context(head) or (label.endswith(".tenseal") and kind is None):  # a leaf: loaded whole
            f = self.context(f, label)
        chunks = ChunkScan(self.index, self.chunk_size, lambda what, detail: self.found(label, what, detail))
        try:
            if kind is not None and depth >= MAX_DEPTH:
                self.unchecked(label, "not fully scanned", f"{kind} nested {depth} deep; {_UNPACK_IT}")
                kind = None
            if kind == "zip":
                self.zip(f, chunks, label, depth, budget)
            elif kind is not None:
                self.unpack(kind, f, chunks, label, depth, budget)
            else:
                chunks.read_all(f)
        finally:
            chunks.close()
        return chunks.size

    def unpack(self, kind: str, f: BinaryIO, chunks: ChunkScan, label: str, depth: int, budget: dec.Budget) -> None:
        """A compressed stream or a tar, unpacked while its own bytes are scanned as they are read."""
        source = dec.Replay(f, sink=chunks.feed)
        try:
            if kind == "tar":
                for name, member in dec.tar_members(source):
                    self.member(member, f"{label}!{name}", depth, budget)
            else:
                unpacked = dec.decompressed(kind, source)
                self.member(unpacked, f"{label}!{dec.inner_name(label)}", depth, budget)
        except dec.UNPACK_ERRORS as e:
            self.unchecked(label, "not fully scanned", f"{kind}: {e}")
        chunks.read_all(source)  # what the unpacker left, if anything

    def member(self, stream: BinaryIO, label: str, depth: int, budget: dec.Budget) -> None:
        capped = dec.Capped(stream, self.member_cap, budget)
        try:
            self.stream(capped, label, depth + 1, budget)
            self.report.members += 1
        except dec.TooLarge as e:
            if e.owner is not capped:
                raise
            self.unchecked(label, "not fully scanned", f"{e}; {_UNPACK_IT}, or raise --max-unpacked")

    def zip(self, f: BinaryIO, chunks: ChunkScan, label: str, depth: int, budget: dec.Budget) -> None:
        if f.seekable():
            chunks.read_all(f)
            f.seek(0)
            self.zip_members(f, label, depth, budget)
            return
        cap = min(_WHOLE_CAP, _HELD_CAP - self.held)  # zipfile seeks: a zip inside an archive is loaded whole
        data = _read_up_to(f, cap + 1)
        if len(data) > cap:
            self.unchecked(label, "not fully scanned", f"zip inside an archive over {cap >> 20} MiB; {_UNPACK_IT}")
            chunks.read_all(dec.Replay(f, data))
            return
        self.held += len(data)
        try:
            chunks.read_all(io.BytesIO(data))
            self.zip_members(io.BytesIO(data), label, depth, budget)
        finally:
            self.held -= len(data)

    def zip_members(self, f: BinaryIO, label: str, depth: int, budget: dec.Budget) -> None:
        entries, size = dec.zip_directory(f)
        if entries > dec.MAX_MEMBERS or size > _ZIP_DIRECTORY_CAP:
            detail = f"zip of {entries} members, {size >> 20} MiB of directory; {_UNPACK_IT}"
            self.unchecked(label, "not fully scanned", detail)
            return
        try:
            with zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    name = f"{label}!{info.filename}"
                    try:
                        with zf.open(info) as member:
                            self.member(member, name, depth, budget)
                    except dec.UNPACK_ERRORS as e:
                        self.unchecked(name, "zip member not checked", str(e))
        except zipfile.BadZipFile as e:
            self.unchecked(label, "zip not opened", str(e))

    def context(self, f: BinaryIO, label: str) -> BinaryIO:
        """Check a stream that may be a TenSEAL context; returns a stream that reads it from its start."""
        data = _read_up_to(f, _WHOLE_CAP + 1)
        if len(data) > _WHOLE_CAP:
            self.unchecked(label, "not loaded as a TenSEAL context", "too large")
        elif private_context(data) is not None:
            self.found(label, "TenSEAL context with secret key", "tenseal.context_from(...).is_private()")
        if f.seekable():
            f.seek(0)
            return f
        return dec.Replay(f, data)

    def found(self, label: str, what: str, detail: str) -> None:
        self.report.findings.append(Finding(label, what, detail))

    def unchecked(self, label: str, what: str, detail: str) -> None:
        self.report.unchecked.append(Finding(label, what, detail))


def _read_up_to(f: BinaryIO, size: int) -> bytes:
    """``size`` bytes, or fewer at the end of the stream (one read may give less)."""
    parts, got = [], 0
    while got < size and (data := f.read(min(size - got, CHUNK_SIZE))):
        parts.append(data)
        got += len(data)
    return b"".join(parts)
