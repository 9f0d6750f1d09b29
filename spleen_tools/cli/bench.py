"""Benchmarks of the federated spleen setup on synthetic data.

``spleen-bench validity``: centralized vs local-only vs FL methods (real NVFlare simulator, ``--methods``; FedAvg by
default) on the same data, bundle settings and epochs, IID and non-IID (``--settings phase``: sites that differ in
contrast phase), per data seed (``--seeds``); writes validity.json, validity.md, a Dice chart per setting and
learning-curve PNGs into runs/bench/validity/<timestamp>/ (or --out DIR).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spleen_tools.algorithms import algorithm_names
from spleen_tools.bench.study_settings import (
    DATA_SETTINGS,
    DEFAULT_SETTINGS,
    StudySettingsError,
    ValiditySettings,
    check_out_dir,
)
from spleen_tools.cli import DefaultsOnceFormatter, OneLineParser
from spleen_tools.paths import RUNS_DIR

DEFAULTS = ValiditySettings()
TINY_ROUNDS, TINY_LOCAL_EPOCHS = 1, 1
VALIDITY_RUNS = RUNS_DIR / "bench" / "validity"


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of whole numbers: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="spleen-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{validity}")
    p = commands.add_parser(
        "validity",
        help="centralized vs local-only vs FL methods, IID, non-IID and contrast phase, per seed",
        description="Train centralized, local-only and federated models (one per FL method) on the same synthetic "
        "data for the same number of epochs (rounds x local epochs), score each on every site's validation data and "
        "held-out cases, and check that each method is close to centralized and better than local-only on the "
        "other sites' data; with several seeds, mean and range over them, and a conclusion only where they agree.",
        formatter_class=DefaultsOnceFormatter,
    )
    p.add_argument("--rounds", type=int, default=None, help=f"FL rounds (default {DEFAULTS.rounds}, tiny 1)")
    p.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help=f"local epochs per round (default {DEFAULTS.local_epochs}, tiny 1)",
    )
    p.add_argument("--sites", type=int, default=DEFAULTS.sites, help="number of sites")
    p.add_argument(
        "--settings",
        type=_comma_list,
        default=DEFAULTS.settings,
        help=f"comma-separated data settings out of {','.join(DATA_SETTINGS)} (default: {','.join(DEFAULT_SETTINGS)}; "
        "phase: site-1 non-contrast, the other sites portal venous)",
    )
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {VALIDITY_RUNS}/<timestamp>)")
    p.add_argument(
        "--methods",
        type=_comma_list,
        default=DEFAULTS.methods,
        help=f"comma-separated FL methods out of {','.join(algorithm_names())} (jobs/algorithms; default: "
        f"{','.join(DEFAULTS.methods)})",
    )
    p.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="comma-separated data seeds, each its own data and training "
        f"(default: {','.join(map(str, DEFAULTS.seeds))})",
    )
    p.add_argument("--seed", type=int, default=None, help="one data seed (the same as --seeds N)")
    p.add_argument("--tiny", action="store_true", help="smoke run: 1 round x 1 epoch, 6 small cases per setting")
    return parser


def settings_from(args: argparse.Namespace) -> ValiditySettings:
    rounds = args.rounds if args.rounds is not None else (TINY_ROUNDS if args.tiny else DEFAULTS.rounds)
    local = (
        args.local_epochs
        if args.local_epochs is not None
        else (TINY_LOCAL_EPOCHS if args.tiny else DEFAULTS.local_epochs)
    )
    if args.seed is not None and args.seeds is not None:
        raise StudySettingsError("--seed N is --seeds N: give one of them")
    seeds = DEFAULTS.seeds
    if args.seeds is not None:
        seeds = args.seeds
    elif args.seed is not None:
        seeds = (args.seed,)
    settings = ValiditySettings(
        rounds=rounds,
        local_epochs=local,
        sites=args.sites,
        settings=args.settings,
        seeds=seeds,
        methods=args.methods,
        tiny=args.tiny,
    )
    settings.validate()
    return settings


def validity(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.out is not None:
        check_out_dir(args.out)
    # Heavy imports (torch, MONAI, NVFlare helpers) only once the input is known to be good.
    from spleen_tools.bench.arms import StudyError
    from spleen_tools.bench.study_report import markdown_report
    from spleen_tools.bench.validity import run_validity
    from spleen_tools.run.rundir import make_run_dir

    out = args.out.resolve() if args.out is not None else make_run_dir(VALIDITY_RUNS)
    print(
        f"validity study into {out}: {settings.epochs} epochs per arm, settings {','.join(settings.settings)}, "
        f"methods {','.join(settings.methods)}, seeds {','.join(map(str, settings.seeds))}"
    )
    try:
        study = run_validity(settings, out, log=lambda msg: print(msg, flush=True))
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print()
    print(markdown_report(study))
    print(f"results: {out / 'validity.json'}")
    print(f"report:  {out / 'validity.md'}")
    for setting, result in study["results"].items():
        print(f"chart:   {result['plots']['dice']}  ({setting})")
        for seed, run in result["seeds"].items():
            for arm, path in run["plots"].items():
                print(f"curves:  {path}  ({setting} seed {seed} {arm})")
    print(f"total: {study['seconds']:.0f} s")
    return 1 if any(r.get("errors") for r in study["results"].values()) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validity":
            return validity(args)
    except StudySettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped what the study started", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
