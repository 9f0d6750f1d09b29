"""HE vs plain round time, side by side: the one command runs the local job and then the HE job, same settings.

Both runs use POC on this machine (full-size network; data and rounds as given), one after the other, each in
its own run directory under ``--runs-dir``/pairK. Prints per-round times, their ratio, the HE cost fields of the HE
run's summary.json (update bytes, encrypt/aggregate/decrypt seconds per round) and the cross-site Dice of both.
Round times are the server's own (NVFlare's "Round N started/finished" log lines); with ``--pairs K`` the
plain and HE runs alternate so that the machine's drift hits both. The sites' own work (validation + training)
also moves with the load of the shared machine, so the script also prints round time minus site work per job:
what HE adds per round whatever the training took. Asserts nothing.
Usage: .venv/bin/python benchmarks/he_round_time.py [--rounds 3 --local-epochs 2 --pairs 1] [-- ARGS]
(ARGS after ``--`` go to both runs, e.g. ``-- --data /data/Task09_Spleen``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import record  # noqa: E402

from spleen_tools.run.summary import HeCosts, RunSummary  # noqa: E402

JOBS = ("local", "he")


def run(job: str, runs_dir: Path, args: argparse.Namespace, extra: list[str]) -> RunSummary:
    cmd = [
        sys.executable,
        "-m",
        "spleen_tools.cli.run_experiment",
        "--job",
        job,
        "--sites",
        str(args.sites),
        "--rounds",
        str(args.rounds),
        "--local-epochs",
        str(args.local_epochs),
        "--synthetic-cases",
        str(args.synthetic_cases),
        "--runs-dir",
        str(runs_dir / job),
        *extra,
    ]
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    summaries = sorted((runs_dir / job).glob("*/summary.json"))
    if proc.returncode != 0 or not summaries:
        sys.exit(f"{job} run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return RunSummary.load(summaries[-1])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _cell(values: list, r: int) -> str:
    value = values[r] if r < len(values) else None
    return f"{value:.1f}" if isinstance(value, float | int) else "-"


def _stage(summary: RunSummary, stage: str) -> list:
    """An HE stage's seconds per round; none for a plain job."""
    return getattr(summary.he, f"{stage}_s") if summary.he else []


def _overheads(times: list[float], summary: RunSummary) -> list[float]:
    """Per round, server round time minus the slowest site's own work: what FL (and HE) add to the training."""
    work = summary.site_work_s
    return [t - w for t, w in zip(times, work, strict=False) if isinstance(w, float | int)]


def pair_figures(plain: RunSummary, he: RunSummary) -> dict:
    """Means over the rounds of one plain/HE pair: round times, what each adds to its sites' work, HE stages."""
    p_times = plain.fl_round_s or plain.round_times_s
    h_times = he.fl_round_s or he.round_times_s
    sizes = he.he or HeCosts()
    p_extra, h_extra = _overheads(p_times, plain), _overheads(h_times, he)
    figures = {
        "plain_round_s": round(_mean(p_times), 2),
        "he_round_s": round(_mean(h_times), 2),
        "he_over_plain": round(_mean(h_times) / _mean(p_times), 3),
        "plain_overhead_s": round(_mean(p_extra), 2) if p_extra else None,
        "he_overhead_s": round(_mean(h_extra), 2) if h_extra else None,
        "wall_s": {"plain": plain.wall_time_s, "he": he.wall_time_s},
        "final_global_dice": {"plain": plain.final_global_dice, "he": he.final_global_dice},
        "update_mb": {
            "plain": round(sizes.update_bytes_plain / 1e6, 1) if sizes.update_bytes_plain else None,
            "encrypted": round(sizes.update_bytes_encrypted / 1e6, 1) if sizes.update_bytes_encrypted else None,
        },
    }
    if p_extra and h_extra:
        figures["he_adds_s"] = round(_mean(h_extra) - _mean(p_extra), 2)
    for stage in ("encrypt", "aggregate", "decrypt"):
        values = [v for v in _stage(he, stage) if isinstance(v, float | int)]
        figures[f"{stage}_s"] = round(_mean(values), 2) if values else None
    return figures


def print_pair(k: int, plain: RunSummary, he: RunSummary, figures: dict) -> None:
    p_times = plain.fl_round_s or plain.round_times_s
    h_times = he.fl_round_s or he.round_times_s
    print(f"\npair {k}")
    print(
        f"{'round':>5}  {'plain s':>8}  {'HE s':>8}  {'HE/plain':>8}  {'HE-plain':>8}  {'work p/HE':>11}  "
        f"{'encrypt':>7}  {'aggregate':>9}  {'decrypt':>7}"
    )
    for r, (p, h) in enumerate(zip(p_times, h_times, strict=False)):
        work = f"{_cell(plain.site_work_s, r)}/{_cell(he.site_work_s, r)}"
        stages = [_cell(_stage(he, stage), r) for stage in ("encrypt", "aggregate", "decrypt")]
        print(
            f"{r:>5}  {p:8.1f}  {h:8.1f}  {h / p:8.2f}  {h - p:8.1f}  {work:>11}  "
            f"{stages[0]:>7}  {stages[1]:>9}  {stages[2]:>7}"
        )
    print(
        f"mean round: plain {figures['plain_round_s']} s, HE {figures['he_round_s']} s, {figures['he_over_plain']}x; "
        f"wall time: plain {figures['wall_s']['plain']} s, HE {figures['wall_s']['he']} s"
    )
    if "he_adds_s" in figures:
        print(
            f"round - site work: plain {figures['plain_overhead_s']} s, HE {figures['he_overhead_s']} s: HE adds "
            f"{figures['he_adds_s']} s per round"
        )
    if figures["update_mb"]["encrypted"]:
        sizes = figures["update_mb"]
        print(f"one client update: plain {sizes['plain']} MB, encrypted {sizes['encrypted']} MB")
    print(f"final global Dice: plain {figures['final_global_dice']['plain']}, HE {figures['final_global_dice']['he']}")


def earlier_pairs(runs_dir: Path) -> list[tuple[RunSummary, RunSummary]]:
    pairs = []
    for pair in sorted(runs_dir.glob("pair*")):
        found = {job: sorted((pair / job).glob("*/summary.json")) for job in JOBS}
        if not all(found.values()):
            print(f"{pair}: no summary.json for {[j for j, f in found.items() if not f]}, left out")
            continue
        done = {job: RunSummary.load(files[-1]) for job, files in found.items()}
        pairs.append((done["local"], done["he"]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--synthetic-cases", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=1, help="plain/HE run pairs, alternating (HE first in odd pairs)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--report", type=Path, metavar="RUNS_DIR", help="only print the figures of earlier runs")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/he_round_time.json")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.report:
        runs_dir = args.report
        pairs = earlier_pairs(runs_dir)
    else:
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="he_round_time_"))
        pairs = []
        for k in range(args.pairs):
            order = JOBS if k % 2 == 0 else JOBS[::-1]  # alternate: the machine's drift hits both
            done = {job: run(job, runs_dir / f"pair{k}", args, extra) for job in order}
            pairs.append((done["local"], done["he"]))

    print(f"\nrun directories: {runs_dir}")
    print("server round = the server's 'Round N started' -> 'Round N finished' (broadcast, site work, encryption,")
    print("upload, aggregation, persist); site work = the slowest site's validation + local training that round")
    results = []
    for k, (plain, he) in enumerate(pairs):
        figures = pair_figures(plain, he)
        print_pair(k, plain, he, figures)
        results.append(figures)
    added = [r["he_adds_s"] for r in results if "he_adds_s" in r]
    if len(results) > 1 and added:
        print(f"\nall {len(results)} pairs: HE adds {_mean(added):.2f} s per round beyond plain's own FL overhead")
    if args.save and results:
        settings = {k: getattr(args, k) for k in ("sites", "rounds", "local_epochs", "synthetic_cases", "pairs")}
        print(f"saved {record.save('he_round_time', {'settings': settings, 'pairs': results})}")


if __name__ == "__main__":
    main()
