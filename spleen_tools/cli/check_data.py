"""Check a dataset (MSD layout: dataset.json, imagesTr, labelsTr) before any training starts.

Every dataset.json entry must give an image and a label path. Every listed image must be a readable 3D CT NIfTI
in Hounsfield units with plausible spacing, finite voxels and a header declaring at most MAX_VOXELS voxels (see
spleen_flare.data_check); every label must be readable, one 3D volume on its image's grid (shape and affine) and
hold only 0 and 1; with --sites, each site must get at least one training and one validation case. Prints one line
per problem (all of them) and exits 2, or says it is fine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spleen_tools.cli import OneLineParser
from spleen_tools.data.check import check_dataset


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="spleen-check-data", description=__doc__)
    parser.add_argument("data", type=Path, help="dataset folder with dataset.json")
    parser.add_argument("--sites", type=int, default=None, help="also check the split into this many sites")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = check_dataset(args.data, args.sites)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    sites = f", split into {args.sites} sites" if args.sites else ""
    print(f"{args.data}: every image and label checked{sites}: fine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
