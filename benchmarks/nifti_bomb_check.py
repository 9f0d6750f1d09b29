"""Peak memory and time of the data check on NIfTI files whose header declares far more than the file holds.

Builds each bomb in a temporary folder from a hand-written header and a gzip stream written a megabyte at a time
(nothing here allocates the volume), then runs the check on it in a fresh process per file: ``spleen-check-data``
on a one-case dataset (the image is the bomb), the same rules every site runs when a job starts and
``spleen-segment`` runs before inference. Prints, per bomb, the file size, what its header declares, the child's
peak resident memory (``os.wait4``'s ``ru_maxrss``), the wall time and the check's first line.

Bombs: a 71-byte ``.nii.gz`` declaring 2000^3 int16 (16 GB) with no voxels at all; a 1 MB gzip stream of zeros
(1024 x 1024 x 512 int16, 1 GiB); the same with ``scl_slope`` set (nibabel scales to floats); a gzip stream whose
header declares a plausible CT (512 x 512 x 1500 int16, 786 MB) and holds it, all zeros; a 2 MB gzip stream whose
header, of a small volume, declares one header extension of 2 GB (nibabel reads extensions whole).

``--save`` records the figures, with those before the fix (``BEFORE``), in benchmarks/results/nifti_bomb_check.json.
Usage: ``.venv/bin/python benchmarks/nifti_bomb_check.py [--only NAME ...] [--save]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import record  # benchmarks/record.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20

# The check on each bomb before the fix of commit 8f8ed30 (its message: "was 2.1-15.7 GB"), as ``run_check``
# reports it. Not re-run: the old code is gone; kept here so the JSON and BENCHMARKS.md carry them.
BEFORE = {
    "provenance": "measured once on the data check before commit 8f8ed30, except where noted",
    "bombs": {
        "header_2000^3": {"peak_rss_mb": 15_700, "seconds": 55, "note": "from the security review, not re-run"},
        "gzip_1GiB": {"peak_rss_mb": 2102, "seconds": 19.1},
        "gzip_1GiB_slope": {"peak_rss_mb": 5168, "seconds": 33.5},
        "gzip_extension": {"peak_rss_mb": 2150, "seconds": 38.9},
        "gzip_plausible": {"peak_rss_mb": 1555, "seconds": 14.7},
    },
}


def nifti_header(shape: tuple[int, ...], slope: float | None = None) -> bytes:
    """A single-file NIfTI-1 header (348 bytes) and the 4-byte 'no extensions' flag: voxels start at byte 352."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((0.8, 0.8, 1.0))
    header.set_qform(np.diag([0.8, 0.8, 1.0, 1.0]), code=1)
    header.set_sform(np.diag([0.8, 0.8, 1.0, 1.0]), code=1)
    header["vox_offset"] = 352
    if slope is not None:
        header.set_slope_inter(slope, -1024.0)
    return header.binaryblock + b"\0\0\0\0"


def extension_header(extension_bytes: int) -> bytes:
    """A NIfTI-1 header of a small volume whose one extension says it is ``extension_bytes`` long: nibabel reads
    an extension whole, as long as its size field says."""
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(nifti_header((64, 64, 16))))
    header["vox_offset"] = 352 + 16
    return header.binaryblock + b"\1\0\0\0" + np.array([extension_bytes, 0], "<i4").tobytes()


def write_gzip(path: Path, head: bytes, zero_bytes: int) -> Path:
    """``head`` then ``zero_bytes`` zeros as one gzip stream, compressed a megabyte at a time."""
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    zeros = bytes(MB)
    with path.open("wb") as f:
        f.write(gz.compress(head))
        for start in range(0, zero_bytes, MB):
            f.write(gz.compress(zeros[: min(MB, zero_bytes - start)]))
        f.write(gz.flush())
    return path


def build_bombs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its header declares)."""
    gib_shape, plausible = (1024, 1024, 512), (512, 512, 1500)
    return {
        "header_2000^3": (write_gzip(folder / "header.nii.gz", nifti_header((2000,) * 3), 0), "2000^3 int16, 16 GB"),
        "gzip_1GiB": (
            write_gzip(folder / "zeros.nii.gz", nifti_header(gib_shape), 2 * int(np.prod(gib_shape))),
            "1024x1024x512 int16, 1 GiB",
        ),
        "gzip_1GiB_slope": (
            write_gzip(folder / "scaled.nii.gz", nifti_header(gib_shape, slope=1.0), 2 * int(np.prod(gib_shape))),
            "1024x1024x512 int16, scl_slope 1, 1 GiB",
        ),
        "gzip_extension": (
            write_gzip(folder / "extension.nii.gz", extension_header(2**31 - 16), 2**31),
            "64x64x16 int16, one 2 GB header extension",
        ),
        "gzip_plausible": (
            write_gzip(folder / "plausible.nii.gz", nifti_header(plausible), 2 * int(np.prod(plausible))),
            "512x512x1500 int16, 786 MB",
        ),
    }


def one_case_dataset(folder: Path, image: Path) -> Path:
    """A dataset.json whose one training case is ``image`` (its label is never read: the image fails first)."""
    data = folder / f"data_{image.name.split('.')[0]}"
    data.mkdir()
    label = data / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), label)
    (data / "dataset.json").write_text(json.dumps({"training": [{"image": str(image), "label": str(label)}]}))
    return data


def run_check(data: Path) -> dict:
    """``spleen-check-data DATA`` in a child process: its peak RSS, wall time, exit code and first line."""
    cmd = [sys.executable, "-m", "spleen_tools.cli.check_data", str(data)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # KiB on Linux
        "seconds": round(time.monotonic() - started, 1),
        "exit": proc.returncode,
        "line": (out.strip().splitlines() or [""])[-1][:160],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="bomb names to run (default: all)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/nifti_bomb_check.json")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, declared) in build_bombs(Path(tmp)).items():
            if args.only and name not in args.only:
                continue
            row = run_check(one_case_dataset(Path(tmp), path))
            results[name] = {"file_bytes": path.stat().st_size, "declares": declared, **row}
            before = BEFORE["bombs"][name]
            print(
                f"{name:16} file {results[name]['file_bytes']:>9,} B  declares {declared:38} "
                f"peak {row['peak_rss_mb']:>6} MB  {row['seconds']:>5} s  exit {row['exit']}  "
                f"(before the fix: {before['peak_rss_mb']} MB, {before['seconds']} s)"
            )
            print(f"{'':16} {row['line']}")
    if args.save:
        print(f"saved {record.save('nifti_bomb_check', {'bombs': results, 'before': BEFORE}, argv=_argv(argv))}")
    return 0


def _argv(argv: list[str] | None) -> list[str]:
    """The command line to record: this script's own when ``main`` was called with ``argv``."""
    return sys.argv if argv is None else [__file__, *argv]


if __name__ == "__main__":
    raise SystemExit(main())
