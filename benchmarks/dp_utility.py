"""Utility against privacy: FedAvg with DP-SGD at the sites at several epsilons, and without DP, on the validity
study's data.

For each data setting and seed (``spleen_tools.bench.study_data``): FedAvg in the NVFlare simulator without DP and
with DP-SGD planned for each epsilon of ``--epsilons`` (the one command's ``--dp EPSILON``: each site's noise
multiplier chosen so that it ends the job at that epsilon, per training case, delta ``--delta``, clipping
``--clip``), the same rounds and local epochs as the validity study; every final global model scored on each site's
validation cases and on the held-out cases. Prints the table (Dice, each site's epsilon and noise multiplier, the
slowest site's seconds per epoch) and writes ``dp_utility.json`` and ``dp_utility.png`` into ``--out``; ``--save``
records ``benchmarks/results/dp_utility.json`` and ``docs/images/dp_utility.png`` for docs/BENCHMARKS.md. Asserts
nothing. Nothing is tuned: the bundle's optimizer and learning rate, clipping 1.0.

Usage: ``.venv/bin/python benchmarks/dp_utility.py [--settings iid] [--seeds 0] [--epsilons 1,3,8,30] [--save]``;
``--record OUT`` records a finished study's folder; ``--extend`` adds its settings to the recorded study's (same
options otherwise), so that one record holds settings run apart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_flare.contract import DP_OVERRIDE_FILE  # noqa: E402
from spleen_tools.bench.arms import CONFIG_FILES, run_fl  # noqa: E402
from spleen_tools.bench.score import HELD_OUT, eval_sets, score_models  # noqa: E402
from spleen_tools.bench.study_data import make_study_data  # noqa: E402
from spleen_tools.jobs import DPOptions  # noqa: E402
from spleen_tools.mlflow_server import MLflowServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECORD = record.RESULTS_DIR / "dp_utility.json"
NO_DP = "no DP"
SAME_OPTIONS = ("seeds", "epsilons", "rounds", "local_epochs", "sites", "clip", "delta", "tiny")


def label(epsilon: float | None) -> str:
    return NO_DP if epsilon is None else f"epsilon {epsilon:g}"


def run_seed(setting: str, seed: int, args: argparse.Namespace, out: Path, tracking_uri: str) -> dict:
    """FedAvg without DP and at each epsilon on one seed's data; every final model scored on every set."""
    work = out / "work" / setting / f"seed-{seed}"
    data = make_study_data(setting, work / "data", args.sites, seed, args.tiny)
    rows = {}
    for epsilon in (None, *args.epsilons):
        name = label(epsilon)
        dp = None if epsilon is None else DPOptions(target_epsilon=epsilon, max_grad_norm=args.clip, delta=args.delta)
        slug = name.replace(" ", "_")
        arm = run_fl(
            data, "fedavg", args.rounds, args.local_epochs, work / slug, tracking_uri, print,
            experiment=f"dp-{setting}-seed-{seed}", dp=dp, name=f"FedAvg {name}",
        )  # fmt: skip
        configs = CONFIG_FILES if dp is None else [*CONFIG_FILES, DP_OVERRIDE_FILE]
        scores = score_models(arm.models, eval_sets(data), data.root, work / slug / "scoring", print, configs)
        dice = next(iter(scores.values()))
        site_dice = [dice[s] for s in data.site_names]
        rows[name] = {
            "dice": dice,
            "mean_sites": round(sum(site_dice) / len(site_dice), 4),
            "held_out": dice[HELD_OUT],
            "site_epoch_s": arm.info.get("site_epoch_s"),
            "epsilon": arm.info.get("dp_epsilon"),
            "noise_multiplier": arm.info.get("dp_noise_multiplier"),
            "seconds": next(iter(arm.seconds.values())),
        }
        print(f"{setting} seed {seed} {name}: {json.dumps(rows[name])}", flush=True)
        shutil.rmtree(work / slug / "workspace", ignore_errors=True)  # the job's copies of the model: 19 MB each
    return {"sites": data.site_names, "cases": kept_description(data.describe()), "rows": rows}


def kept_description(described: dict) -> dict:
    """What a record keeps of the data's description: not its folder on the machine that ran it."""
    return {k: v for k, v in described.items() if k != "root"}


def mean_over_seeds(seeds: dict[str, dict]) -> dict[str, dict]:
    """Per arm: mean (and range) over seeds of the sites' mean Dice and the held-out Dice; mean seconds per epoch."""
    arms = next(iter(seeds.values()))["rows"]
    out = {}
    for name in arms:
        rows = [run["rows"][name] for run in seeds.values()]
        means, held = [r["mean_sites"] for r in rows], [r["held_out"] for r in rows]
        epochs = [r["site_epoch_s"] for r in rows if r["site_epoch_s"] is not None]
        epsilons = [max(r["epsilon"].values()) for r in rows if r["epsilon"]]
        out[name] = {
            "mean_sites": round(sum(means) / len(means), 4),
            "mean_sites_range": [min(means), max(means)],
            "held_out": round(sum(held) / len(held), 4),
            "site_epoch_s": round(sum(epochs) / len(epochs), 2) if epochs else None,
            "epsilon": max(epsilons) if epsilons else None,
        }
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for setting, summary in result["summary"].items():
        dp = [(v["epsilon"], v["mean_sites"]) for k, v in summary.items() if k != NO_DP and v["epsilon"] is not None]
        xs, ys = zip(*sorted(dp), strict=True) if dp else ((), ())
        (line,) = ax.plot(xs, ys, "o-", label=f"{setting}: FedAvg + DP-SGD")
        ax.axhline(summary[NO_DP]["mean_sites"], color=line.get_color(), linestyle="--", label=f"{setting}: no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon per site at the end of the job (delta 1e-5, per training case)")
    ax.set_ylabel("final global model: mean Dice on the sites' validation")
    ax.set_ylim(0, 1)
    ax.set_title("Utility against privacy (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(result: dict) -> None:
    for setting, summary in result["summary"].items():
        print(
            f"\n{setting}: arm, mean Dice on the sites' validation (range over seeds), held-out Dice, epsilon, s/epoch"
        )
        for name, row in summary.items():
            lo, hi = row["mean_sites_range"]
            eps = f"{row['epsilon']:.2f}" if row["epsilon"] is not None else "-"
            print(f"  {name:12s} {row['mean_sites']:.4f} ({lo:.4f}-{hi:.4f})  {row['held_out']:.4f}  {eps:>6}  "
                  f"{row['site_epoch_s']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="iid", help="comma-separated: iid, noniid, phase")
    parser.add_argument("--seeds", default="0", help="comma-separated data seeds")
    parser.add_argument("--epsilons", default="1,3,8,30", help="comma-separated target epsilons")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--clip", type=float, default=1.0, help="per-case clipping norm")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny data (use with --rounds 1)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "runs" / "bench" / "dp_utility" / time.strftime("%Y%m%d-%H%M%S")
    )
    parser.add_argument("--save", action="store_true", help="record benchmarks/results/dp_utility.json and the PNG")
    parser.add_argument("--record", type=Path, metavar="OUT", help="record a finished study's OUT folder (no training)")
    parser.add_argument("--note", help="with --record or --save: what the reader should know of the run (contention)")
    parser.add_argument("--extend", action="store_true", help="with --record or --save: add to the recorded settings")
    args = parser.parse_args(argv)
    if args.extend and not (args.record or args.save):
        parser.error("--extend adds a study to the record: use it with --save or --record OUT")
    if args.record:
        result = json.loads((args.record / "dp_utility.json").read_text())
        return save(result | ({"note": args.note} if args.note else {}), args.record, args.extend)
    args.epsilons = [float(e) for e in args.epsilons.split(",") if e]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "save")}
    result: dict = {"settings": settings, "results": {}, "summary": {}}
    with MLflowServer(args.out / "work" / "mlflow") as server:
        for setting in args.settings.split(","):
            seeds = {}
            for seed in (int(s) for s in args.seeds.split(",")):
                seeds[str(seed)] = run_seed(setting, seed, args, args.out, server.url)
                result["results"][setting] = seeds
                result["summary"][setting] = mean_over_seeds(seeds)
                result["seconds"] = round(time.perf_counter() - start, 1)
                (args.out / "dp_utility.json").write_text(json.dumps(result, indent=2) + "\n")
    chart = plot(result, args.out / "dp_utility.png")
    print_table(result)
    print(f"\n{args.out / 'dp_utility.json'}, {chart} ({result['seconds']:.0f} s)")
    return save(result | ({"note": args.note} if args.note else {}), args.out, args.extend) if args.save else 0


def study_command(settings: dict) -> str:
    """The command line that runs a study of these settings."""
    args = ["--settings", settings["settings"], "--seeds", settings["seeds"], "--epsilons"]
    args += [",".join(f"{e:g}" for e in settings["epsilons"]), "--rounds", settings["rounds"], "--local-epochs"]
    args += [settings["local_epochs"], "--sites", settings["sites"], "--clip", settings["clip"], "--delta"]
    args += [settings["delta"], "--save"]
    return " ".join([".venv/bin/python", "benchmarks/dp_utility.py", *map(str, args)])


def run_entry(result: dict, date: str, machine: dict) -> dict:
    """One study run of a record: its settings, when, where, how long, and its note."""
    entry = {"settings": ",".join(result["results"]), "date": date, "machine": machine}
    entry["seconds"] = result.get("seconds")
    return entry | ({"note": result["note"]} if result.get("note") else {})


def extended(result: dict, recorded: dict) -> dict:
    """The recorded study with this one's settings added: the same options otherwise, no setting twice."""
    old = recorded["result"]
    differ = [k for k in SAME_OPTIONS if old["settings"].get(k) != result["settings"].get(k)]
    if differ:
        raise SystemExit(
            f"error: {RECORD.name} was recorded with other {', '.join(differ)}: run with its options "
            f"({recorded['command']}) or record without --extend"
        )
    twice = sorted(set(old["results"]) & set(result["results"]))
    if twice:
        raise SystemExit(f"error: {RECORD.name} already holds {', '.join(twice)}: record it without --extend")
    runs = old.get("runs") or [run_entry(old, recorded["date"], recorded["machine"])]
    runs.append(run_entry(result, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), record.machine()))
    settings = old["settings"] | {"settings": ",".join([*old["results"], *result["results"]])}
    return {
        "settings": settings,
        "results": old["results"] | result["results"],
        "summary": old["summary"] | result["summary"],
        "seconds": round(sum(run["seconds"] or 0 for run in runs), 1),
        "runs": runs,
    }


def save(result: dict, out: Path, extend: bool = False) -> int:
    for seeds in result["results"].values():  # a run recorded later (--record) may still name its folder
        for run in seeds.values():
            run["cases"] = kept_description(run["cases"])
    if extend:
        result = extended(result, json.loads(RECORD.read_text()))
    chart = plot(result, out / ("dp_utility_extended.png" if extend else "dp_utility.png"))
    print(f"copied {shutil.copyfile(chart, REPO / 'docs' / 'images' / 'dp_utility.png')}")
    print(f"saved {record.save('dp_utility', result, command=study_command(result['settings']))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
