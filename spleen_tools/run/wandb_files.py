"""W&B offline runs read back from a downloaded job (``--tracking wandb``).

wandb 0.31 has no reader of its own for a run file (``run-<id>.wandb``): its Go core writes it, ``wandb sync``
uploads it. The format is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each a 7-byte header (CRC-32 of type and data, length, type: full/first/middle/last) and its
data; a record is one ``wandb_internal_pb2.Record``. The file came from the server, so every length is bounded by
its block and the whole file by a cap, and a bad checksum ends the read with the file named.
"""

from __future__ import annotations

import json
import shlex
import struct
import zlib
from pathlib import Path

from spleen_flare.contract import WANDB_FAILED_LOGIN, WANDB_FOLDER
from spleen_flare.contract import WANDB_STEP_SUFFIX as STEP_SUFFIX
from spleen_tools.run.tracking import SITE_IN_RUN_NAME, Curves

HEADER = struct.Struct("<4sHB")
HEADER_VALUES = (b":W&B", 0xBEE1, 0)
CHUNK = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
MAX_RUN_FILE = 256 * 1024 * 1024  # a short FL run's file is a few hundred KB
MAX_RECORD = 16 * 1024 * 1024


class WandbFileError(ValueError):
    """A run file that is not W&B's, or is damaged: the message names the file."""


def read_records(path: Path) -> list[bytes]:
    """The serialized records of one run file, in order."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_RUN_FILE:
        raise WandbFileError(f"{path}: {size} bytes, more than a run file of this project ({MAX_RUN_FILE})")
    data = path.read_bytes()
    if len(data) < HEADER.size or HEADER.unpack_from(data) != HEADER_VALUES:
        raise WandbFileError(f"{path}: not a W&B run file (no ':W&B' header)")
    records, parts, offset = [], [], HEADER.size
    while offset + CHUNK.size <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < CHUNK.size:  # a block's tail too short for a chunk header is padding
            offset += left_in_block
            continue
        checksum, length, kind = CHUNK.unpack_from(data, offset)
        if checksum == 0 and length == 0 and kind == 0:  # zero padding at the end of a block
            offset += left_in_block
            continue
        body = data[offset + CHUNK.size : offset + CHUNK.size + length]
        if length > left_in_block - CHUNK.size or len(body) != length or kind not in (FULL, FIRST, MIDDLE, LAST):
            raise WandbFileError(f"{path}: damaged chunk at byte {offset}")
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise WandbFileError(f"{path}: checksum mismatch at byte {offset}")
        offset += CHUNK.size + length
        parts = [body] if kind in (FULL, FIRST) else parts + [body]
        if sum(map(len, parts)) > MAX_RECORD:
            raise WandbFileError(f"{path}: a record larger than {MAX_RECORD} bytes at byte {offset}")
        if kind in (FULL, LAST):
            records.append(b"".join(parts))
            parts = []
    return records


def read_run(path: Path) -> tuple[str, list[dict]]:
    """A run's display name and its history rows ({key: value})."""
    from wandb.proto import wandb_internal_pb2

    name, rows = "", []
    for raw in read_records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception as e:  # protobuf's DecodeError and friends: the file named, not a traceback
            raise WandbFileError(f"{path}: a record W&B cannot parse ({type(e).__name__})") from None
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
        elif kind == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return name, rows


def run_files(download_dir: Path, sites: list[str], unreadable: list[str] | None = None) -> dict[str, str]:
    """Each site's offline run file in the downloaded job (``wandb_runs/wandb/offline-run-*/run-*.wandb``); a file
    that cannot be read is skipped, its one-line reason added to ``unreadable``."""
    found: dict[str, str] = {}
    for path in sorted(Path(download_dir).rglob("run-*.wandb")):
        if WANDB_FOLDER not in path.relative_to(download_dir).parts:
            continue
        try:
            match = SITE_IN_RUN_NAME.match(read_run(path)[0])
        except WandbFileError as e:
            if unreadable is not None:
                unreadable.append(str(e))
            continue
        if match and match.group(1) in sites:
            found.setdefault(match.group(1), str(path))
    return found


def failed_login(download_dir: Path) -> str | None:
    """The server's warning that its W&B login failed (online mode), from the downloaded job's logs."""
    for log in sorted(Path(download_dir).rglob("log.txt")):
        with log.open(errors="replace") as lines:
            for line in lines:
                if WANDB_FAILED_LOGIN in line:
                    return line[line.index(WANDB_FAILED_LOGIN) :].strip()[:400]
    return None


def wandb_info(download_dir: Path, sites: list[str], mode: str) -> dict:
    """summary.json's ``wandb``: each site's run file, how to upload them, and what went wrong."""
    unreadable: list[str] = []
    files = run_files(download_dir, sites, unreadable)
    return {
        "mode": mode,
        "run_files": files,
        "sync": sync_command(files) if files else None,
        "failed_login": failed_login(download_dir),
        "unreadable": unreadable,
    }


def series(rows: list[dict], metrics: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) points, sorted by step: its own ``<metric>_step`` field, else W&B's ``_step``."""
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in metrics}
    for row in rows:
        for name in metrics:
            if isinstance(row.get(name), (int, float)):
                out[name].append((int(row.get(name + STEP_SUFFIX, row.get("_step", 0))), float(row[name])))
    return {name: sorted(points) for name, points in out.items()}


def wandb_curves(files: dict[str, str], metrics: tuple[str, ...]) -> Curves:
    """Each site's series from its offline run file."""
    return {site: series(read_run(Path(path))[1], metrics) for site, path in sorted(files.items())}


def sync_command(files: dict[str, str]) -> str:
    """The command that uploads the offline runs (after ``wandb login``)."""
    return shlex.join([".venv/bin/wandb", "sync", *sorted(str(Path(p).parent) for p in files.values())])
