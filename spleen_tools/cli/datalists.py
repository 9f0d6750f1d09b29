"""Write per-site datalists (site-1.json .. site-N.json) from an MSD-style dataset folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spleen_tools.data.datalists import make_site_datalists
from spleen_tools.data.download import DATA_ROOT_ENV, TASK_NAME, default_data_root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__ + " By default each site gets its own disjoint training and validation cases.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"dataset folder with dataset.json (default: ${DATA_ROOT_ENV}/{TASK_NAME} or ./data/{TASK_NAME})",
    )
    parser.add_argument("--sites", type=int, default=2, help="number of sites (default: 2)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <data>/datalists)")
    parser.add_argument(
        "--shared",
        action="store_true",
        help="give every site the same lists (the original example: bundle split, last cases for validation)",
    )
    parser.add_argument("--num-val", type=int, default=None, help="validation cases per site (default: ~20%%)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the per-site split (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = args.data if args.data is not None else default_data_root() / TASK_NAME
    try:
        written = make_site_datalists(
            data, args.sites, out_dir=args.out, num_val=args.num_val, shared=args.shared, seed=args.seed
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for site, path in written.items():
        print(f"{site}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
