"""A soak: many short rounds through the one command, and what grows per round.

Runs ``python -m spleen_tools.cli.run_experiment`` on POC with tiny data and one local epoch for ``--rounds`` rounds
and, each time the run prints "round k/N done", samples the server and each site (the participant's process and
every descendant: NVFlare's job process and the site's training process): resident memory, open file descriptors
and threads; and the disk use of the run directory and of its MLflow store. Then fits a line per series over the
rounds after ``--warmup`` (numpy least squares) and prints the growth per round with the fit's R^2. Asserts
nothing; ``--save`` writes ``benchmarks/results/soak.json`` (``--name``: another record) for ``docs/BENCHMARKS.md``.

Usage: ``.venv/bin/python benchmarks/soak.py [--rounds 200] [--warmup 10] [--save]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_tools.procs import ProcessRef  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_DONE = re.compile(r"round (\d+)/\d+ done")
SITES = ("site-1", "site-2")


def tree_usage(pid: int) -> dict[str, float]:
    """Resident MB, open descriptors and threads of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"rss_mb": 0.0, "fds": 0, "threads": 0}
    rss = fds = threads = 0
    for proc in procs:
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                fds += proc.num_fds()
                threads += proc.num_threads()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"rss_mb": round(rss / 2**20, 1), "fds": fds, "threads": threads}


def disk_mb(path: Path) -> float:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return round(total / 2**20, 1)


def sample(run_dir: Path) -> dict:
    processes = json.loads((run_dir / "pids.json").read_text())["poc"]["processes"]
    pid = {name: ProcessRef.from_json(ref).pid for name, ref in processes.items()}
    out = {"server": tree_usage(pid["server"]), **{site: tree_usage(pid[site]) for site in SITES}}
    out["disk_run_mb"] = disk_mb(run_dir)
    out["disk_mlflow_mb"] = disk_mb(run_dir / "mlflow") if (run_dir / "mlflow").is_dir() else 0.0
    return out


def fit(rounds: list[int], values: list[float]) -> dict:
    """Slope per round and R^2 of a least-squares line."""
    x, y = np.asarray(rounds, float), np.asarray(values, float)
    if len(x) < 3 or np.ptp(x) == 0:
        return {"per_round": None, "r2": None}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return {"per_round": round(float(slope), 4) + 0.0, "r2": round(r2, 3)}  # + 0.0: no "-0.0"


def growth(samples: list[dict], warmup: int) -> dict:
    kept = [s for s in samples if s["round"] > warmup]
    rounds = [s["round"] for s in kept]
    out = {}
    for who in ("server", *SITES):
        for key in ("rss_mb", "fds", "threads"):
            out[f"{who}.{key}"] = fit(rounds, [s[who][key] for s in kept])
    for key in ("disk_run_mb", "disk_mlflow_mb"):
        out[key] = fit(rounds, [s[key] for s in kept])
    return out


def run_soak(rounds: int, warmup: int, runs: Path, echo=print) -> dict:
    """``rounds`` rounds of the one command in ``runs``, sampled after each; the fits leave out ``warmup`` rounds."""
    cmd = [
        sys.executable, "-m", "spleen_tools.cli.run_experiment", "--rounds", str(rounds), "--local-epochs", "1",
        "--quick", "--synthetic-cases", "4", "--synthetic-shape", "48x48x16", "--runs-dir", str(runs),
        "--timeout", str(60 + 30 * rounds),
    ]  # fmt: skip
    echo("$ " + " ".join(cmd))
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, tail = [], []
    for line in proc.stdout:
        tail = [*tail[-40:], line]
        found = _DONE.search(line)
        if found:
            samples.append({"round": int(found.group(1)), "at_s": round(time.monotonic() - started, 1)})
            samples[-1].update(sample((runs / "latest").resolve()))
            if int(found.group(1)) % 10 == 0:
                echo(f"round {found.group(1)}: {json.dumps(samples[-1])}")
    rc = proc.wait()
    if rc != 0 or not samples:
        raise RuntimeError(f"the run failed (exit {rc}); see {runs}/latest\n{''.join(tail)}")
    result = {"rounds": rounds, "warmup": warmup, "wall_s": round(time.monotonic() - started, 1)}
    result["growth"] = growth(samples, warmup)
    result["first"], result["last"] = samples[min(warmup, len(samples) - 1)], samples[-1]
    result["samples"] = samples
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200, help="FL rounds (default: 200)")
    parser.add_argument("--warmup", type=int, default=10, help="rounds left out of the fit (default: 10)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/<--name>.json")
    parser.add_argument("--name", default="soak", help="the record's name (default: soak)")
    args = parser.parse_args(argv)
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="soak_"))
    try:
        result = run_soak(args.rounds, args.warmup, runs, echo=lambda text: print(text, flush=True))
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    for name, value in result["growth"].items():
        print(f"{name}: {value['per_round']} per round (R^2 {value['r2']})")
    if args.save:
        print(f"saved {record.save(args.name, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
