"""Round time and server memory for 2, 4 and 8 sites on one machine (tiny data), through the one command.

Each run is ``run_experiment`` on POC with N sites, tiny synthetic data (2 cases per site and a few more),
``--rounds`` rounds x 1 local epoch. Round times and the server's peak memory come from the run's ``summary.json``
(the server's own round start/end, the slowest site's work, and the resident set of the server process and its
job process, which the one command samples every half second).

Usage: ``.venv/bin/python benchmarks/site_scaling.py [--sites 2 4 8] [--rounds 2] [--save]``.
Nothing else may run on the machine meanwhile (POC ports are fixed; the timings are the point).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_tools.paths import BIN_DIR, REPO_ROOT  # noqa: E402
from spleen_tools.run.summary import RunSummary  # noqa: E402


def one_run(sites: int, rounds: int, runs_dir: Path) -> dict:
    cmd = [str(BIN_DIR / "python"), "-m", "spleen_tools.cli.run_experiment", "--sites", str(sites)]
    cmd += ["--rounds", str(rounds), "--local-epochs", "1", "--quick", "--synthetic-cases", str(2 * sites + 2)]
    cmd += ["--synthetic-shape", "80x80x20", "--runs-dir", str(runs_dir), "--timeout", "1500"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1600)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{sites} sites: exit {proc.returncode}: {proc.stderr[-1000:]}")
    summary = RunSummary.load(next(runs_dir.glob("*/summary.json")))
    return {
        "sites": sites,
        "wall_s": round(wall, 1),
        "fl_round_s": summary.fl_round_s,
        "site_work_s": summary.site_work_s,
        "server_peak_mb": summary.server_peak_memory_mb,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/site_scaling.json")
    args = parser.parse_args(argv)
    rows = []
    for sites in args.sites:
        with tempfile.TemporaryDirectory() as tmp:
            row = one_run(sites, args.rounds, Path(tmp))
        rows.append(row)
        print(
            f"{sites} sites: server round times {row['fl_round_s']} s, slowest site's work {row['site_work_s']} s, "
            f"server peak memory {row['server_peak_mb']} MB, wall {row['wall_s']} s",
            flush=True,
        )
    if args.save:
        print(f"saved {record.save('site_scaling', {'rounds': args.rounds, 'runs': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
