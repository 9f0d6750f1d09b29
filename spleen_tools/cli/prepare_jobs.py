"""Place the bundle into the job folders (the code is installed at each participant), optionally writing a
configured copy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spleen_tools.algorithms import algorithm_names, check_under_he
from spleen_tools.cli import add_dp_options, dp_options
from spleen_tools.jobs import JOB_NAMES, JOB_VARIANTS, TRACKING_MODES, WANDB_MODES, JobSettings, prepare_job
from spleen_tools.paths import BUNDLE_SRC, JOBS_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", choices=JOB_NAMES, action="append", help="job to prepare (default: all)")
    parser.add_argument(
        "--bundle-src",
        type=Path,
        default=BUNDLE_SRC,
        help="bundle folder to place into the jobs (every participant must have installed the same one: "
        "$SPLEEN_BUNDLES_DIR)",
    )
    parser.add_argument("--out", type=Path, help="write a configured copy of each job here (needed for the knobs)")
    parser.add_argument("--rounds", type=int, help="FL rounds")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round")
    parser.add_argument("--sites", type=int, help="minimum number of sites (clients)")
    parser.add_argument(
        "--site-timeout",
        type=int,
        help="seconds the server waits for a site's answer (training, validation, its model) before it goes on",
    )
    parser.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None, help="CPU-quick override")
    parser.add_argument(
        "--tracking",
        choices=TRACKING_MODES,
        help="the server's metrics receiver: MLflow at --tracking-uri (server), MLflow SQLite in the job's result "
        "(workspace), TensorBoard files (tensorboard) or W&B runs (wandb); default: the job's own (server)",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for the server's receiver")
    parser.add_argument("--wandb-project", help="--tracking wandb: the W&B project (default: the job's experiment)")
    parser.add_argument(
        "--wandb-mode",
        choices=WANDB_MODES,
        default="offline",
        help="--tracking wandb: offline (default; no account, the runs come back with the job) or online (needs "
        "WANDB_API_KEY in the server's environment; a failed login keeps the runs offline)",
    )
    parser.add_argument(
        "--resume-from",
        metavar="JOB_ID",
        help="go on from the last global model an earlier job of the same server persisted (after the server died; "
        "keep --rounds the total of both)",
    )
    parser.add_argument(
        "--algorithm",
        choices=algorithm_names(),
        help="the FL method of the training jobs (jobs/algorithms/<name>.json; default: the jobs' own, FedAvg)",
    )
    add_dp_options(parser)
    parser.add_argument(
        "--ship-code",
        action="store_true",
        help="development only: put spleen_flare into the jobs' app/custom (bring-your-own-code); sites refuse such "
        "jobs unless their policy allows it (POC with ./run_experiment.sh --ship-code)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = JobSettings(
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        min_clients=args.sites,
        site_timeout=args.site_timeout,
        quick=args.quick,
        tracking=args.tracking,
        tracking_uri=args.tracking_uri,
        wandb_project=args.wandb_project,
        wandb_mode=args.wandb_mode,
        resume_from=args.resume_from,
        ship_code=args.ship_code,
        algorithm=args.algorithm,
        dp=dp_options(args),
    )
    try:
        for name in args.job or JOB_NAMES:
            if not (JOBS_DIR / name).is_dir():
                continue
            if args.algorithm and not args.job and name == JOB_VARIANTS["he"]:
                try:
                    check_under_he(args.algorithm, he=True)
                except ValueError as err:  # asked for all jobs: the HE one is left out, saying why
                    print(f"skipped {name}: {err}")
                    continue
            path = prepare_job(name, args.out, settings, args.bundle_src)
            print(f"prepared {path}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
