"""Run the federated spleen job on a real NVFlare system (POC by default) with an MLflow server, in one command.

Makes runs/<timestamp>/ (runs/latest points at it) with the data's datalists, the job copy, the POC workspace,
the MLflow store, the logs, the downloaded job and summary.json (``--job stats``: stats.json and stats.png); stops
everything it started when done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spleen_tools.algorithms import algorithm_names
from spleen_tools.cli import DefaultsOnceFormatter, OneLineParser, add_dp_options, dp_options
from spleen_tools.jobs import JOB_VARIANTS, TRACKING_MODES
from spleen_tools.paths import RUNS_DIR
from spleen_tools.run.prune import KEEP_CHOICES
from spleen_tools.run.runner import run_experiment
from spleen_tools.run.settings import (
    ExperimentError,
    ExperimentSettings,
    RunTimeout,
    SettingsError,
    Terminated,
)
from spleen_tools.run.stop import stop_run
from spleen_tools.systems.base import cuda_device_count

DEFAULTS = ExperimentSettings()


def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected XxYxZ like 96x96x24, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"expected three sizes >= 16 like 96x96x24, got {text!r}")
    return parts  # type: ignore[return-value]


def add_job_options(p: argparse.ArgumentParser) -> None:
    """Which job runs, its FL method, and the statistics job's minimum count."""
    d = DEFAULTS
    p.add_argument(
        "--job",
        choices=sorted(JOB_VARIANTS),
        default=d.job,
        help="local = FedAvg, he = FedAvg + HE, stats = federated statistics of the sites' CT (stats.json and "
        "stats.png; no training)",
    )
    p.add_argument(
        "--algorithm",
        choices=algorithm_names(),
        default=d.algorithm,
        help="the FL method of a training job (jobs/algorithms/<name>.json): fedavg, fedprox (proximal term at the "
        "sites), fedopt (SGD with momentum on the server; not with --job he), fedbn (BatchNorm layers stay at each "
        "site), scaffold (control variates correct each site's drift; not with --job he)",
    )
    add_dp_options(p)
    p.add_argument(
        "--stats-min-count",
        type=int,
        help="--job stats: a site with fewer cases sends its count only (default: the job's, 3; a site's own policy "
        "may ask more)",
    )


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = OneLineParser(description=__doc__, formatter_class=DefaultsOnceFormatter)
    add_job_options(p)
    p.add_argument("--sites", type=int, default=d.sites, help="number of sites (site-1..N)")
    p.add_argument(
        "--min-clients",
        type=int,
        default=None,
        help="sites a round needs (default: all); with fewer, a site that drops out is reported and the job goes on",
    )
    p.add_argument(
        "--site-timeout",
        type=int,
        default=None,
        help="seconds the server waits for a site's answer (training a round, validating, sending its model); a site "
        "silent for longer is reported as dropped (default: the job's, 3600 s for a round, 900 s otherwise)",
    )
    p.add_argument(
        "--max-resumes",
        type=int,
        default=d.max_resumes,
        help="times a job lost with a restarted server is resumed from its last global model (0: report and stop)",
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="FL rounds")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="local epochs per round")
    p.add_argument(
        "--quick",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU-quick bundle override (default: on when CUDA is unavailable)",
    )
    p.add_argument(
        "--gpus",
        type=gpu_ids,
        default=(),
        metavar="IDS",
        help="GPU per site, comma-separated: 0 puts every site on GPU 0, 0,1 gives site-1 GPU 0 and site-2 GPU 1 "
        "(several sites may share one); sites then train the full bundle with AMP unless --quick (default: each "
        "site's CUDA default, GPU 0 where there is one)",
    )
    p.add_argument("--data", type=Path, help="a real MSD Task09_Spleen folder (default: synthetic data)")
    p.add_argument(
        "--skip-data-check",
        action="store_true",
        help="do not check --data before starting (e.g. checked already); each site still checks its own cases "
        "when the job starts and the run prints their problems",
    )
    p.add_argument("--synthetic-cases", type=int, default=d.synthetic_cases, help="synthetic training cases")
    p.add_argument("--synthetic-shape", type=_shape, default=d.synthetic_shape, help="synthetic volume size XxYxZ")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where run directories go")
    p.add_argument("--secure", action="store_true", help="use the provisioned secure workspace instead of POC")
    p.add_argument(
        "--ship-code",
        action="store_true",
        help="development only (POC): ship spleen_flare in the job (bring-your-own-code) and let the POC sites "
        "accept such jobs; by default the job carries no code and the sites run what they installed",
    )
    p.add_argument("--keep-running", action="store_true", help="leave the FL system and MLflow up afterwards")
    p.add_argument(
        "--keep",
        choices=KEEP_CHOICES,
        default=d.keep,
        help="what a successful run keeps: every participant's copy of the model (all, about 410 MB for the demo) "
        "or the results (the model bundle, summary.json, the server's final and best global models, every log)",
    )
    p.add_argument("--timeout", type=float, default=d.timeout, help="give up (and stop everything) after seconds")
    p.add_argument("--mlflow-port", type=int, help="MLflow port on 127.0.0.1 (default: a free one)")
    p.add_argument(
        "--tracking",
        choices=TRACKING_MODES,
        default=d.tracking,
        help="where the sites' metrics go: an MLflow server (default; MLflow installed), the job's own MLflow "
        "SQLite store (workspace), TensorBoard event files (tensorboard), or W&B runs (wandb; offline, no account, "
        "unless WANDB_API_KEY and WANDB_PROJECT are set); all but the first come back with the downloaded job",
    )
    p.add_argument("--stop", type=Path, metavar="RUN_DIR", help="stop what a --keep-running run left up, and exit")
    return p


def gpu_ids(text: str) -> tuple[int, ...]:
    """``--gpus 0,1`` -> (0, 1)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU ids as integers, comma-separated (e.g. 0 or 0,1)") from None


def check_gpus(gpus: tuple[int, ...]) -> None:
    """Every GPU named is on this machine (the sites of the one command run here)."""
    count = cuda_device_count()
    if gpus and max(gpus) >= count:
        raise SettingsError(
            f"--gpus {','.join(map(str, gpus))}: this machine has {count} CUDA GPU(s)"
            + (f" (ids 0-{count - 1})" if count else "; leave --gpus out to train on the CPU")
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.stop is not None:
            return stop_run(args.stop)
        quick = args.quick if args.quick is not None else cuda_device_count() == 0
        settings = ExperimentSettings(
            job=args.job,
            sites=args.sites,
            min_clients=args.min_clients,
            site_timeout=args.site_timeout,
            max_resumes=args.max_resumes,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            quick=quick,
            data=args.data,
            check_data=not args.skip_data_check,
            synthetic_cases=args.synthetic_cases,
            synthetic_shape=args.synthetic_shape,
            runs_dir=args.runs_dir,
            keep_running=args.keep_running,
            keep=args.keep,
            secure=args.secure,
            ship_code=args.ship_code,
            timeout=args.timeout,
            mlflow_port=args.mlflow_port,
            tracking=args.tracking,
            gpus=args.gpus,
            stats_min_count=args.stats_min_count,
            algorithm=args.algorithm,
            dp=dp_options(args),
        )
        settings.validate()
        check_gpus(settings.gpus)
        return run_experiment(settings, out=lambda msg: print(msg, flush=True))
    except RunTimeout as err:
        print(f"error: {err}", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        print("interrupted: stopped everything this run started", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: stopped everything this run started", file=sys.stderr)
        return 143
    except SettingsError as err:
        for line in str(err).splitlines():  # the data check lists every problem, a line each
            print(f"error: {line}", file=sys.stderr)
        return 2
    except ExperimentError as err:
        for line in str(err).splitlines():  # a site's data problems, a line each, then the job's status
            print(f"error: {line}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
