"""Time and peak memory of ``spleen-segment`` on one full-size CT (512 x 512 x N) on the CPU.

Makes a synthetic scan of that size with the project's generator, runs ``spleen-segment`` on it with a model
bundle (default: the latest run's export), and reports the wall time and the peak resident memory of the
segmenting process (``getrusage`` of the child). Time and memory are the point: the demo's model was trained on
small synthetic phantoms (a 77 mm field of view), so its mask of a 410 mm body says nothing about its quality.

Usage: ``.venv/bin/python benchmarks/segment_full_size.py [--bundle DIR] [--slices 120] [--save]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_tools.data.synthetic import make_synthetic_dataset  # noqa: E402
from spleen_tools.paths import BIN_DIR, BUNDLE_NAME, RUNS_DIR  # noqa: E402

DEFAULT_BUNDLE = RUNS_DIR / "latest" / "model_bundle" / BUNDLE_NAME


def segment_once(bundle: Path, slices: int, spacing: tuple[float, float, float], work: Path) -> dict:
    data = make_synthetic_dataset(work / "data", num_train=1, num_test=0, shape=(512, 512, slices), spacing=spacing)
    scan = next((data / "imagesTr").iterdir())
    cmd = [str(BIN_DIR / "spleen-segment"), "--bundle", str(bundle), "--input", str(scan), "--output", str(work)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"spleen-segment failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    (row,) = json.loads((work / "segmentation.json").read_text())["scans"]
    import nibabel as nib

    mask = nib.load(row["mask"])
    if mask.shape != nib.load(scan).shape:
        raise SystemExit(f"the mask's shape {mask.shape} differs from the scan's")
    return {
        "shape": list(mask.shape),
        "spacing_mm": list(spacing),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle (default: the latest run's)")
    parser.add_argument("--slices", type=int, default=120, help="axial slices (about; the generator varies +-4)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/segment_full_size.json")
    args = parser.parse_args(argv)
    if not (args.bundle / "models" / "model.pt").is_file():
        raise SystemExit(f"no model bundle at {args.bundle}: run ./run_experiment.sh first, or give --bundle DIR")
    with tempfile.TemporaryDirectory() as tmp:
        result = segment_once(args.bundle.resolve(), args.slices, (0.8, 0.8, 2.5), Path(tmp))
    result["bundle"] = str(args.bundle)
    print(
        f"one scan {'x'.join(map(str, result['shape']))} ({'x'.join(map(str, result['spacing_mm']))} mm): "
        f"{result['seconds']} s, peak memory {result['peak_rss_mb']} MB (mask, overlay and volume written)"
    )
    if args.save:
        print(f"saved {record.save('segment_full_size', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
