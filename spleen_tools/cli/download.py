"""Download MSD Task09_Spleen (md5-checked, resumable) or write a small synthetic stand-in in the same layout."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spleen_tools.data.download import (
    DATA_ROOT_ENV,
    MSD_MD5,
    MSD_URL,
    TASK_NAME,
    DownloadError,
    dataset_is_complete,
    default_data_root,
    download_spleen,
)


def setup_logging() -> None:
    """Show the helpers' progress messages on stdout (errors go to stderr from main)."""
    logger = logging.getLogger("spleen_tools")
    for handler in [h for h in logger.handlers if getattr(h, "_spleen_cli", False)]:
        logger.removeHandler(handler)  # main() may run several times in one process (tests)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._spleen_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help=f"folder that receives {TASK_NAME}/ (default: ${DATA_ROOT_ENV} or ./data)",
    )
    parser.add_argument("--url", default=MSD_URL, help="archive URL, e.g. a mirror (default: %(default)s)")
    parser.add_argument("--md5", default=MSD_MD5, help="expected md5 of the archive (default: %(default)s)")
    parser.add_argument("--keep-archive", action="store_true", help="keep the .tar after extracting it")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default: 60)")
    syn = parser.add_argument_group("synthetic data (no download)")
    syn.add_argument("--synthetic", action="store_true", help="write small synthetic volumes instead of downloading")
    syn.add_argument("--num-train", type=int, default=12, help="labelled training cases (default: 12)")
    syn.add_argument("--num-test", type=int, default=2, help="unlabelled test cases (default: 2)")
    syn.add_argument(
        "--shape", type=int, nargs=3, default=(96, 96, 24), metavar=("X", "Y", "Z"), help="voxels (default: 96 96 24)"
    )
    syn.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(0.8, 0.8, 5.0),
        metavar=("X", "Y", "Z"),
        help="voxel size in mm (default: 0.8 0.8 5.0)",
    )
    syn.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    dest = args.dest if args.dest is not None else default_data_root()
    try:
        if args.synthetic:
            task_dir = dest / TASK_NAME
            if dataset_is_complete(task_dir):
                print(f"{task_dir} already exists and is complete; skipping (remove it to regenerate)")
                return 0
            from spleen_tools.data.synthetic import make_synthetic_dataset  # numpy/nibabel only when needed

            path = make_synthetic_dataset(
                dest,
                num_train=args.num_train,
                num_test=args.num_test,
                shape=tuple(args.shape),
                spacing=tuple(args.spacing),
                seed=args.seed,
            )
            print(f"synthetic dataset ready in {path}")
        else:
            download_spleen(dest, url=args.url, md5=args.md5, keep_archive=args.keep_archive, timeout=args.timeout)
    except (DownloadError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume the download", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
