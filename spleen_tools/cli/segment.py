"""Segment the spleen in new CT scans with an exported model bundle (its own inference.json, run by MONAI).

Writes per scan a mask (NIfTI with the scan's shape and affine), an overlay PNG (axial slice with the largest
spleen area and a coronal view), prints the spleen volume in mL and, with --labels, the Dice; segmentation.json
lists them all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spleen_tools.cli import OneLineParser
from spleen_tools.paths import BUNDLE_NAME, RUNS_DIR
from spleen_tools.segment.inputs import InputError
from spleen_tools.segment.segmenter import segment

DEFAULT_BUNDLE = RUNS_DIR / "latest" / "model_bundle" / BUNDLE_NAME


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="spleen-segment", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle (default: the latest run's)")
    parser.add_argument("--input", type=Path, required=True, help="a CT NIfTI file (.nii.gz) or a folder of them")
    parser.add_argument("--output", type=Path, required=True, help="folder for masks, overlays, segmentation.json")
    parser.add_argument("--labels", type=Path, default=None, help="folder of labels named like the scans: Dice")
    parser.add_argument(
        "--device", default="cpu", help="torch device to segment on: cpu (default), cuda, cuda:1 (AMP on CUDA)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        segment(args.bundle.resolve(), args.input.resolve(), args.output.resolve(), args.labels, device=args.device)
    except InputError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
