"""Compressed files and archives for the secrets scan, opened as streams with a cap on what they may unpack.

gzip, bzip2, xz and zstd streams (concatenated ones too), tar (stream mode, so a .tar.gz is read once) and zip are
recognised by their first bytes whatever their names. Every unpacked stream goes through ``Capped``: past its own
cap, or past the budget of the file on disk it came from, reading raises ``TooLarge`` instead of going on.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

import zstandard

_READ = 1 << 20  # compressed bytes read at a time
_XZ_MEMORY = 256 << 20  # an xz header may ask for a dictionary of gigabytes
_TAR_BUFFER = 1 << 16  # tarfile reads this much at a time
_TAR_HEADER_CAP = 1 << 20  # GNU long names and pax headers (X: Solaris) are read whole by tarfile
_TAR_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, b"X")
_EOCD = struct.Struct("<4s4H2LH")  # zip end of central directory: ..., entries, size, offset, comment length
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # ..., offset of the zip64 end record, ...
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")  # ..., entries on this disk, entries, size, offset
MAX_MEMBERS = 100_000  # per archive
_INNER_NAMES = {".gz": "", ".bz2": "", ".xz": "", ".zst": "", ".tgz": ".tar", ".tbz2": ".tar", ".txz": ".tar"}

UNPACK_ERRORS = (
    OSError,  # gzip.BadGzipFile, bz2 errors
    EOFError,  # truncated streams
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
    tarfile.TarError,
    zipfile.BadZipFile,
    NotImplementedError,  # a zip compression method Python lacks
    RuntimeError,  # an encrypted zip member
)


# --- archives -----------------------------------------------------------------------------------------------------


def archive_kind(head: bytes) -> str | None:
    """The archive or compression a stream starts with ("gzip", "bzip2", "xz", "zstd", "zip", "tar"), or None;
    ``head`` is its first 512 bytes."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def inner_name(label: str) -> str:
    """What a compressed file holds: "logs.tar" for ".../logs.tgz", "key.pem" for "key.pem.gz"."""
    name = re.split(r"[/!]", label)[-1]
    stem, dot, suffix = name.rpartition(".")
    if dot and f".{suffix}" in _INNER_NAMES:
        return stem + _INNER_NAMES[f".{suffix}"]
    return f"{name} (unpacked)"


def decompressed(kind: str, source: BinaryIO) -> BinaryIO:
    """The stream that ``source`` (gzip, bzip2, xz or zstd) unpacks to, read as it goes."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=source, mode="rb")
    if kind == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
    if kind == "bzip2":
        return _Streams(source, bz2.BZ2Decompressor)
    return _Streams(source, lambda: lzma.LZMADecompressor(memlimit=_XZ_MEMORY))


class _Decompressor(Protocol):
    eof: bool
    needs_input: bool
    unused_data: bytes

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Streams:
    """Concatenated bzip2 or xz streams. BZ2File and LZMAFile would pass over bytes after the last stream that do
    not unpack (they are not scanned as unpacked, so here they are an error) and LZMAFile takes no memory limit."""

    def __init__(self, source: BinaryIO, new: Callable[[], _Decompressor]) -> None:
        self.source, self.new, self.unpacker = source, new, new()

    def read(self, size: int = -1) -> bytes:
        size = size if size > 0 else _READ
        while True:
            if self.unpacker.eof:  # another stream may follow, after zero bytes of xz stream padding
                data = self.unpacker.unused_data.lstrip(b"\0")
                while not data and (more := self.source.read(_READ)):
                    data = more.lstrip(b"\0")
                if not data:
                    return b""
                self.unpacker = self.new()
            elif self.unpacker.needs_input:
                data = self.source.read(_READ)
                if not data:
                    raise EOFError("compressed data ends before the end-of-stream marker")
            else:
                data = b""
            if out := self.unpacker.decompress(data, size):
                return out


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long name or a pax header whole, whatever size its header claims: cap it (tarfile names
    _proc_member as the method a subclass may override)."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_HEADERS and self.size > _TAR_HEADER_CAP:
            raise tarfile.HeaderError(f"{self.name}: extended header of {self.size} bytes")
        return super()._proc_member(tar)


def tar_members(source: BinaryIO) -> Iterator[tuple[str, BinaryIO]]:
    """(name, stream) of each regular file in a tar stream, read once in order. Then the rest of ``source`` is read:
    anything but zero bytes after the end of the archive (or after a header tarfile stops at) raises TarError."""
    counted = _Recent(source, keep=2 * _TAR_BUFFER + tarfile.BLOCKSIZE)
    with tarfile.open(fileobj=counted, mode="r|", bufsize=_TAR_BUFFER, tarinfo=_BoundedTarInfo) as tar:
        count = 0
        while (info := tar.next()) is not None:
            tar.members.clear()  # it would keep every header: 1 GiB of tar is 2 million of them
            count += 1
            if count > MAX_MEMBERS:
                raise tarfile.TarError(f"more than {MAX_MEMBERS} members")
            if info.isreg():
                yield info.name, tar.extractfile(info)
        end = counted.since(tar.offset)  # the header it stopped at, and what it read past it
    rest_is_padding = _only_padding(counted)  # read in full either way: the caller scans it as it is
    if end is None or end.strip(b"\0") or not rest_is_padding:
        raise tarfile.TarError("data after the end of the tar archive")


def zip_directory(f: BinaryIO) -> tuple[int, int]:
    """(entries, bytes) of a seekable zip's central directory as its end records declare them: zipfile reads it whole
    into objects ten times its size. (0, 0) when there is no end record (zipfile will refuse the file)."""
    f.seek(0, io.SEEK_END)
    f.seek(max(0, f.tell() - _EOCD.size - 0xFFFF))  # the end record, then a comment of at most 64 KiB
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return 0, 0
    entries, size = _EOCD.unpack_from(tail, at)[4:6]
    locator = at - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        f.seek(_ZIP64_LOCATOR.unpack_from(tail, locator)[2])
        record = f.read(_ZIP64_END.size)
        if len(record) == _ZIP64_END.size and record.startswith(b"PK\x06\x06"):
            entries, size = _ZIP64_END.unpack(record)[7:9]
    return entries, size


def _only_padding(source: BinaryIO) -> bool:
    clean = True
    while data := source.read(_READ):
        clean = clean and not data.strip(b"\0")
    return clean


class _Recent:
    """A stream that counts the bytes it gave and keeps the last ``keep`` of them."""

    def __init__(self, source: BinaryIO, keep: int) -> None:
        self.source, self.keep, self.count, self.recent = source, keep, 0, bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.count += len(data)
        self.recent += data
        del self.recent[: -self.keep]
        return data

    def since(self, offset: int) -> bytes | None:
        """The bytes from ``offset`` in the stream to what was last given, or None if they are no longer kept."""
        back = self.count - offset
        return bytes(self.recent[len(self.recent) - back :]) if 0 <= back <= len(self.recent) else None


# --- streams ------------------------------------------------------------------------------------------------------


class TooLarge(Exception):
    """Raised by a ``Capped`` stream; ``owner`` is the stream whose cap, or the budget whose total, was reached."""

    def __init__(self, owner: object, limit: int) -> None:
        super().__init__(f"unpacks to more than {limit >> 20} MiB")
        self.owner = owner


class Budget:
    """Bytes that all the streams unpacked from one file on disk may give, together."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit


class Capped:
    """A stream that gives at most ``limit`` bytes, and no more than its budget has left; then raises TooLarge."""

    def __init__(self, source: BinaryIO, limit: int, budget: Budget) -> None:
        self.source, self.limit, self.left, self.budget = source, limit, limit, budget

    def read(self, size: int = -1) -> bytes:
        size = size if size >= 0 else _READ  # never read() to the end: that alone could exhaust memory
        data = self.source.read(min(size, self.left + 1, self.budget.left + 1))
        if len(data) > self.left:
            raise TooLarge(self, self.limit)
        if len(data) > self.budget.left:
            raise TooLarge(self.budget, self.budget.limit)
        self.left -= len(data)
        self.budget.left -= len(data)
        return data

    def seekable(self) -> bool:
        return False


class Replay:
    """``head`` (already read from ``source``), then the rest of ``source``; every byte given is also passed to
    ``sink`` when there is one (the scan of a compressed file as it is, while it is being unpacked)."""

    def __init__(self, source: BinaryIO, head: bytes = b"", sink: Callable[[bytes], None] | None = None) -> None:
        self.source, self.head, self.at, self.sink = source, head, 0, sink

    def read(self, size: int = -1) -> bytes:
        size = size if size >= 0 else _READ  # never all at once: that alone could exhaust memory
        if self.at < len(self.head):
            data = self.head[self.at : self.at + size]
            self.at += len(data)
        else:
            self.head = b""
            data = self.source.read(size)
        if self.sink is not None:
            self.sink(data)
        return data

    def seekable(self) -> bool:
        return False
