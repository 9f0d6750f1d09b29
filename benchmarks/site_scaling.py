"""Round time and memory against the number of sites on one machine (tiny data): the simulator and POC.

Each run trains the local job on tiny synthetic data (80x80x20, 2 cases per site and 2 more), ``--rounds`` rounds
x 1 local epoch, every site with its share of the cores. POC runs go through the one command (``run_experiment``
with N sites); simulator runs are ``nvflare simulator -n N -t N`` on the same job. Memory is sampled every half
second: per participant (the server's and each site's process tree, from the run's pids.json) on POC, the whole
simulator's process tree in the simulator. Round times are the server's own (start to end of each round).

A POC run is skipped, and says so, where the memory fitted on the smaller runs predicts more than
``MEMORY_SHARE`` of this machine's memory. Per-site cost: a least-squares line of the mean round time (rounds after
the first) and of the peak memory against the number of sites.

Usage: ``.venv/bin/python benchmarks/site_scaling.py [--sites 2 4 8 16] [--systems simulator poc] [--rounds 3]
[--save]``. Nothing else may run on the machine meanwhile (POC ports are fixed; the timings are the point).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402
from soak import tree_usage  # noqa: E402

from spleen_tools.data import make_site_datalists, make_synthetic_dataset  # noqa: E402
from spleen_tools.jobs import JobSettings, prepare_job  # noqa: E402
from spleen_tools.paths import BIN_DIR, REPO_ROOT  # noqa: E402
from spleen_tools.procs import ProcessRef  # noqa: E402
from spleen_tools.run.progress import Progress, parse_event  # noqa: E402
from spleen_tools.run.summary import RunSummary  # noqa: E402
from spleen_tools.systems.simulator import run_simulator  # noqa: E402

SHAPE = (80, 80, 20)
MEMORY_SHARE = 0.85  # of the machine's total: above it a POC run would swap or be killed


class Sampler(threading.Thread):
    """Peak resident MB of named process trees, found again on every sample (they come and go)."""

    def __init__(self, find, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.find, self.interval = find, interval
        self.peaks: dict[str, float] = {}
        self.total_peak = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                rss = {name: tree_usage(pid)["rss_mb"] for name, pid in self.find().items()}
            except (OSError, ValueError, KeyError):
                continue  # pids.json not written yet, or written while we read it
            for name, mb in rss.items():
                self.peaks[name] = max(self.peaks.get(name, 0.0), mb)
            self.total_peak = max(self.total_peak, sum(rss.values()))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def poc_participants(runs_dir: Path):
    def find() -> dict[str, int]:
        pids = next(runs_dir.glob("*/pids.json"), None)
        processes = json.loads(pids.read_text())["poc"]["processes"] if pids else {}
        # the participants (each with its job process below it), not their restart loops or the POC starter
        wanted = [n for n in processes if n == "server" or (n.startswith("site-") and not n.endswith("_daemon"))]
        return {name: ProcessRef.from_json(processes[name]).pid for name in wanted}

    return find


def poc_run(sites: int, rounds: int, runs_dir: Path) -> dict:
    cmd = [str(BIN_DIR / "python"), "-m", "spleen_tools.cli.run_experiment", "--sites", str(sites)]
    cmd += ["--rounds", str(rounds), "--local-epochs", "1", "--quick", "--synthetic-cases", str(2 * sites + 2)]
    cmd += ["--synthetic-shape", "x".join(map(str, SHAPE)), "--runs-dir", str(runs_dir), "--timeout", "2400"]
    cmd += ["--tracking", "tensorboard"]  # the server's receiver only: no MLflow server in the memory figures
    sampler = Sampler(poc_participants(runs_dir))
    sampler.start()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=2500)
    wall = time.monotonic() - t0
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"POC, {sites} sites: exit {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    summary = RunSummary.load(next(runs_dir.glob("*/summary.json")))
    site_peaks = [mb for name, mb in sampler.peaks.items() if name != "server"]
    return {
        "sites": sites,
        "wall_s": round(wall, 1),
        "fl_round_s": summary.fl_round_s,
        "site_work_s": summary.site_work_s,
        "server_peak_mb": sampler.peaks.get("server"),
        "site_peak_mb": round(max(site_peaks), 1) if site_peaks else None,
        "total_peak_mb": round(sampler.total_peak, 1),
    }


def simulator_run(sites: int, rounds: int, work: Path) -> dict:
    data = make_synthetic_dataset(work / "data", num_train=2 * sites + 2, num_test=0, shape=SHAPE, seed=5)
    make_site_datalists(data, num_sites=sites)
    settings = JobSettings(
        rounds=rounds, local_epochs=1, min_clients=sites, quick=True, tracking="tensorboard", ship_code=True
    )
    job = prepare_job("spleen_ct_segmentation_local", work / "jobs", settings)
    me = psutil.Process()
    sampler = Sampler(lambda: {f"simulator-{child.pid}": child.pid for child in me.children()})
    sampler.start()
    t0 = time.monotonic()
    sim = run_simulator(job, work / "simulator", sites, data, timeout=2400)
    wall = time.monotonic() - t0
    sampler.stop()
    log = sim.log_path.read_text(errors="replace")
    if sim.returncode != 0:
        raise RuntimeError(f"simulator, {sites} sites: exit {sim.returncode}: {log[-3000:]}")
    names = [f"site-{i}" for i in range(1, sites + 1)]
    progress = Progress(names, rounds)
    site_logs = [p.read_text(errors="replace") for p in sorted(sim.workspace.rglob("log.txt"))]
    for line in "\n".join([log, *site_logs]).splitlines():
        if event := parse_event(line):
            progress.add(event)
    return {
        "sites": sites,
        "wall_s": round(wall, 1),
        "fl_round_s": progress.fl_round_times(),
        "site_work_s": progress.site_work_times(),
        "total_peak_mb": round(sampler.total_peak, 1),
    }


def line_fit(xs: list[float], ys: list[float]) -> dict | None:
    """Slope, intercept and R^2 of a least-squares line; None below 2 points."""
    if len(xs) < 2:
        return None
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - (slope * x + intercept)) ** 2).sum()) / total if total > 0 else 1.0
    return {"per_site": round(float(slope), 3), "intercept": round(float(intercept), 2), "r2": round(r2, 3)}


def steady_round_s(row: dict) -> float | None:
    later = (row.get("fl_round_s") or [])[1:]  # round 0 holds the sites' start-up
    return round(sum(later) / len(later), 2) if later else None


def fits(rows: list[dict]) -> dict:
    done = [r for r in rows if not r.get("skipped")]
    xs = [r["sites"] for r in done]
    out = {"round_s": line_fit(xs, [steady_round_s(r) for r in done]) if all(map(steady_round_s, done)) else None}
    out["total_peak_mb"] = line_fit(xs, [r["total_peak_mb"] for r in done])
    if done and "server_peak_mb" in done[0]:
        out["server_peak_mb"] = line_fit(xs, [r["server_peak_mb"] for r in done])
    return out


def predicted_mb(rows: list[dict], sites: int) -> float | None:
    fit = fits(rows)["total_peak_mb"] if len([r for r in rows if not r.get("skipped")]) >= 2 else None
    return fit["per_site"] * sites + fit["intercept"] if fit else None


def run_system(system: str, site_counts: list[int], rounds: int) -> dict:
    rows: list[dict] = []
    limit_mb = MEMORY_SHARE * psutil.virtual_memory().total / 2**20
    for sites in site_counts:
        expected = predicted_mb(rows, sites)
        if system == "poc" and expected and expected > limit_mb:
            rows.append({"sites": sites, "skipped": f"predicted {expected / 1024:.1f} GB > {limit_mb / 1024:.1f} GB"})
            print(f"{system}, {sites} sites: skipped ({rows[-1]['skipped']})", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = (poc_run if system == "poc" else simulator_run)(sites, rounds, Path(tmp))
        rows.append(row)
        print(
            f"{system}, {sites} sites: server round times {row['fl_round_s']} s, slowest site's work "
            f"{row['site_work_s']} s, peak memory {row['total_peak_mb']} MB in all"
            + (f" (server {row['server_peak_mb']}, largest site {row['site_peak_mb']})" if system == "poc" else "")
            + f", wall {row['wall_s']} s",
            flush=True,
        )
    result = {"runs": rows, "fit": fits(rows)}
    print(f"{system}: per-site cost {json.dumps(result['fit'])}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--systems", nargs="+", choices=["simulator", "poc"], default=["simulator", "poc"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/site_scaling.json")
    args = parser.parse_args(argv)
    result = {"rounds": args.rounds, "shape": list(SHAPE), "memory_share": MEMORY_SHARE}
    result["systems"] = {system: run_system(system, sorted(args.sites), args.rounds) for system in args.systems}
    if args.save:
        print(f"saved {record.save('site_scaling', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
