"""What one stream's bytes hold: PEM private key markers and the kit secrets' needles, looked for in the bytes with
their layout taken out, chunk by chunk.

Normalizing (``TextPiece``) drops zero bytes (UTF-16 and UTF-32 text becomes ASCII), all whitespace (base64 and hex
wrapped at any width), colons (hex as ``openssl -text`` prints it) and escaped line breaks (``\\n`` in JSON). Needles
are normalized the same way (``searchable``): a copy of a needle in the data, as is or laid out anew, is a copy of
the normalized needle in the normalized data. ``ChunkScan`` reads a stream in chunks that overlap, so nothing across
a border is missed, and names each finding by where it starts in the stream as written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np

from spleen_tools.run.kit_secrets import Secret

DROPPED = b"\x00\t\n\v\f\r :"
OVERLAP = 256  # normalized bytes carried into the next chunk: more than any needle or PEM marker
_ESCAPE = re.compile(rb"\\[nrt]")  # an escaped line break (or tab) in JSON or a Python repr
_KEPT = np.ones(256, dtype=bool)
_KEPT[list(DROPPED)] = False
_PEM_MARKER = re.compile(rb"-----BEGIN[A-Z0-9]{0,64}PRIVATEKEY(?:BLOCK)?-----")  # normalized: no spaces
_GRAM = 8
_STRIDE = 16  # grams of the data looked up: at offsets 0, 16, 32, ...
_TABLE_BITS = 20  # 1 MiB table: stays in cache
_HASH = np.uint64(0x9E3779B97F4A7C15)


# --- normalized text ----------------------------------------------------------------------------------------------


def searchable(needle: bytes) -> tuple[bytes, int]:
    """The needle as the normalized data holds it, and the offset in the needle where that form starts.

    A backslash in front of a copy may eat its first letter (``\\n``), and a trailing backslash the next byte: those
    ends are cut off.
    """
    piece = TextPiece(needle, 0, None)  # holds back a trailing backslash
    first = 1 if piece.text[:1] in (b"n", b"r", b"t") else 0
    text = piece.text[first:]
    return text, (piece.stream_offset(first) if text else 0)


class TextPiece:
    """One chunk of a stream, normalized; a backslash that ends it is held for the next chunk (it may start ``\\n``).

    ``stream_offset(i)`` is where the i-th byte of ``text`` lies in the stream (numpy, only asked on a hit).
    """

    def __init__(self, block: bytes, base: int, carried: int | None) -> None:
        self.block, self.base, self.carried = block, base, carried  # carried: stream offset of a held backslash
        text = (b"\\" if carried is not None else b"") + block.translate(None, DROPPED)
        self.held: int | None = None  # stream offset of a backslash held for the next piece
        if text.endswith(b"\\"):
            text = text[:-1]
            self.held = self._last_kept()
        self._joined = text
        self.text = _ESCAPE.sub(b"", text) if b"\\" in text else text
        self._offsets: np.ndarray | None = None

    def _last_kept(self) -> int:
        stripped = self.block.rstrip(DROPPED)
        return self.base + len(stripped) - 1 if stripped else self.carried

    def stream_offset(self, i: int) -> int:
        if self._offsets is None:
            offsets = self.base + np.flatnonzero(_KEPT[np.frombuffer(self.block, dtype=np.uint8)])
            if self.carried is not None:
                offsets = np.concatenate([[self.carried], offsets])
            offsets = offsets[: len(self._joined)]  # less the held backslash
            if len(self.text) != len(self._joined):
                escapes = [i for m in _ESCAPE.finditer(self._joined) for i in (m.start(), m.start() + 1)]
                offsets = np.delete(offsets, escapes)
            self._offsets = offsets
        return int(self._offsets[i])


# --- the scan of one stream ----------------------------------------------------------------------------------


class NeedleIndex:
    """Needles by their 8-byte grams: one vectorised hash look-up per 8 bytes of data, whatever the needle count.

    The needles are normalized like the data (``searchable``). A needle of 23 bytes or more holds a
    whole gram at a multiple of 16 wherever it lies, so grams of the data at offsets 0, 16, 32, ... are enough; a
    hit is then compared byte for byte.
    """

    def __init__(self, secrets: list[Secret]) -> None:
        self.by_gram: dict[int, list[tuple[bytes, int, int, Secret]]] = {}
        for secret in secrets:
            for raw in secret.needles:
                needle, lead = searchable(raw)
                if len(needle) > OVERLAP:
                    raise ValueError(f"{secret.name}: needle of {len(needle)} bytes")
                if len(needle) < _STRIDE + _GRAM - 1:  # mostly bytes that normalizing drops: others remain
                    continue
                for off in range(len(needle) - _GRAM + 1):
                    gram = int.from_bytes(needle[off : off + _GRAM], "little")
                    self.by_gram.setdefault(gram, []).append((needle, off, lead, secret))
        self.table = np.zeros(1 << _TABLE_BITS, dtype=bool)
        self.known = np.array(sorted(self.by_gram), dtype=np.uint64)
        self.table[_hash(self.known)] = True

    def hits(self, buf: bytes) -> Iterator[tuple[int, int, Secret]]:
        """(offset in buf, bytes of the raw needle before that offset, secret) of every needle in buf."""
        if not self.by_gram:
            return
        grams = np.frombuffer(buf, dtype="<u8", count=len(buf) // _GRAM)[:: _STRIDE // _GRAM]
        cand = np.flatnonzero(self.table[_hash(grams)])
        values = grams[cand]
        at = np.minimum(np.searchsorted(self.known, values), len(self.known) - 1)
        for i in cand[self.known[at] == values].tolist():  # hash collisions dropped
            for needle, off, lead, secret in self.by_gram[int(grams[i])]:
                start = _STRIDE * i - off
                if start >= 0 and buf[start : start + len(needle)] == needle:
                    yield start, lead, secret


def _hash(grams: np.ndarray) -> np.ndarray:
    hashed = grams * _HASH
    return np.right_shift(hashed, np.uint64(64 - _TABLE_BITS), out=hashed)


class ChunkScan:
    """One stream's bytes as they come (``feed``, ``read_all``, then ``close``): PEM markers and needles in the
    normalized text; ``report(what, detail)`` once per kind of finding."""

    def __init__(self, index: NeedleIndex, chunk_size: int, report: Callable[[str, str], None]) -> None:
        if chunk_size <= OVERLAP:
            raise ValueError(f"chunk_size must exceed {OVERLAP} bytes")
        self.index, self.chunk_size, self.report, self.seen = index, chunk_size, report, set[str]()
        self.parts: list[bytes] = []
        self.pending = self.size = 0
        self.text_tail = b""
        self.piece: TextPiece | None = None

    def feed(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.pending += len(data)
            if self.pending >= self.chunk_size:
                self._chunk()

    def read_all(self, f: BinaryIO) -> None:
        while data := f.read(self.chunk_size):
            self.feed(data)

    def close(self) -> None:
        if self.parts:
            self._chunk()

    def _chunk(self) -> None:
        block, base = b"".join(self.parts), self.size
        self.parts, self.pending, self.size = [], 0, base + len(block)
        previous = self.piece
        self.piece = piece = TextPiece(block, base, previous.held if previous else None)
        text, tail = self.text_tail + piece.text, len(self.text_tail)
        marker = "PEM private key" not in self.seen and b"-----BEGIN" in text and _PEM_MARKER.search(text)
        if marker:  # (`in` first: faster than the regex alone)
            start, end = (_stream_offset(i, tail, previous, piece) for i in (marker.start(), marker.end() - 1))
            written = _marker(marker.group(), previous, piece, start, end)
            self.found("PEM private key", f"{written} {_at(start, base)}")
        for start, lead, secret in self.index.hits(text):
            what = f"copy of {secret.name}"
            if what not in self.seen:
                offset = _stream_offset(start, tail, previous, piece)
                self.found(what, _at(None if offset is None else offset - lead, base))
        self.text_tail = text[-OVERLAP:]

    def found(self, what: str, detail: str) -> None:
        if what not in self.seen:  # one finding per stream and kind
            self.seen.add(what)
            self.report(what, detail)


def _stream_offset(i: int, tail: int, previous: TextPiece | None, piece: TextPiece) -> int | None:
    """Where byte i of (the normalized tail of the chunks before, this piece's text) lies in the stream."""
    if i >= tail:
        return piece.stream_offset(i - tail)
    j = len(previous.text) - (tail - i) if previous else -1
    return previous.stream_offset(j) if previous and j >= 0 else None  # the tail can span tiny chunks


def _marker(normalized: bytes, previous: TextPiece | None, piece: TextPiece, start: int | None, end: int | None) -> str:
    """The marker as the stream spells it, UTF-16 zero bytes left out, when it lies in this chunk and the one before."""
    first = previous if previous is not None and start is not None and start < piece.base else piece
    if start is None or end is None or start < first.base:
        return normalized.decode()
    written = first.block[start - first.base : end - first.base + 1]
    if first is previous:
        written += piece.block[: end - piece.base + 1]
    return " ".join(written.replace(b"\0", b"").decode("ascii", "replace").split())


def _at(offset: int | None, base: int) -> str:
    return f"at byte {offset}" if offset is not None else f"before byte {base}"
