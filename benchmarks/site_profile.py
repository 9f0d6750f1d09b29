"""Where a site's time goes inside the FL client: py-spy samples one site's job process during a run.

Starts the one command (POC, synthetic data, the given rounds and local epochs) in its own process group, waits
for the site's job process (the child of the site's client process in the run's ``pids.json``), and records it
with py-spy until the job ends: ``--rate`` samples per second of every thread that is running (py-spy leaves out
threads that wait). Each sample is sorted by its thread and stack into the categories below; the shares say what
the site spends its CPU on besides the bundle's own training and validation, which a standalone
``python -m monai.bundle run`` spends too.

Usage: ``.venv/bin/python benchmarks/site_profile.py [--site site-1] [--rounds 4] [--local-epochs 5] [--save]``.
Nothing else may run on the machine meanwhile (POC ports are fixed; the shares are the point).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_tools.paths import BIN_DIR, REPO_ROOT  # noqa: E402
from spleen_tools.procs import PidFile, ProcessRef, start_group, stop_started, wait_for  # noqa: E402
from spleen_tools.run.summary import RunSummary  # noqa: E402

TRAINER_THREAD = "client_api_in_process_trainer"  # NVFlare's in-process Client API runs our script on it
# (category, any of these in a frame of the trainer thread's stack), first match wins
TRAINER_CATEGORIES = (
    ("metrics streaming (our stats handler, NVFlare's MetricsSender)", ("stats_handler.py", "metrics_sender")),
    ("model in/out (weights into and out of the network, conversion)", ("set_weights", "get_weights", "convert_")),
    ("bundle set-up (config parsing, network, data lists)", ("open_site", "BundleRunner.__init__")),
    ("validation (bundle evaluator)", ("SupervisedEvaluator", "BundleRunner.evaluate")),
    ("training: data loading and transforms", ("DataLoader", "_next_data", "__next__ (torch")),
    ("training: forward, backward, optimizer, post-processing", ("SupervisedTrainer._iteration",)),
    ("training: engine and handlers (epoch ends, logging)", ("BundleRunner.train",)),
)
THREAD_CATEGORIES = (
    ("NVFlare: job log streaming to the server", ("log_streamer",)),
    ("NVFlare: heartbeats and monitors", ("heartbeat", "monitor", "rm_monitor")),
    ("NVFlare: messaging (cell, frames, streams, connections)", ("frame_mgr", "aio_ctx", "stm", "conn_mgr")),
)


IMPORTS = "start-up: importing modules (torch, MONAI, NVFlare, ...)"


def classify(stack: str) -> str:
    frames = stack.split(";")
    thread = frames[0]
    if any("_find_and_load" in frame for frame in frames):  # any thread, e.g. the script's own imports
        return IMPORTS
    if TRAINER_THREAD in thread:
        for name, needles in TRAINER_CATEGORIES:
            if any(needle in frame for frame in frames[1:] for needle in needles):
                return name
        return "our script, other (task loop, NVFlare Client API calls)"
    for name, needles in THREAD_CATEGORIES:
        if any(needle in thread for needle in needles):
            return name
    return "other threads (NVFlare job process: executor, task fetching, main)"


def shares(raw: Path) -> tuple[int, Counter]:
    counts: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[classify(stack)] += int(n)
    return sum(counts.values()), counts


def site_job_process(runs_dir: Path, site: str) -> int | None:
    """PID of the site's job process: the child of the site's client process, once a job runs."""
    for pid_file in runs_dir.glob("*/pids.json"):
        rec = (PidFile(pid_file).read().get("poc") or {}).get("processes", {}).get(site)
        client = ProcessRef.from_json(rec).process() if rec else None
        children = client.children() if client else []
        if children:
            return children[0].pid
    return None


def profile(args: argparse.Namespace, runs_dir: Path) -> dict:
    cmd = [str(BIN_DIR / "python"), "-m", "spleen_tools.cli.run_experiment", "--runs-dir", str(runs_dir)]
    cmd += ["--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs)]
    started = time.monotonic()
    run = start_group(cmd, runs_dir / "run.log", cwd=REPO_ROOT)
    try:
        wait_for(
            lambda: site_job_process(runs_dir, args.site) is not None,
            timeout=600,
            what=f"{args.site}'s job process",
            interval=0.2,
            alive=lambda: run.poll() is None,
        )
        pid = site_job_process(runs_dir, args.site)
        raw = runs_dir / "profile.raw"
        spy = [str(BIN_DIR / "py-spy"), "record", "-p", str(pid), "--rate", str(args.rate), "--format", "raw"]
        spy += ["--nonblocking", "--threads", "-o", str(raw)]
        subprocess.run(spy, check=True, capture_output=True, timeout=3600)  # ends with the job process
        if run.wait(timeout=600) != 0:
            raise RuntimeError(f"the run failed: see {runs_dir / 'run.log'}")
    finally:
        stop_started(run)
    if args.raw:
        shutil.copy(raw, args.raw)
    total, counts = shares(raw)
    summary = RunSummary.load(next(runs_dir.glob("*/summary.json")))
    return {
        "site": args.site,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "rate_hz": args.rate,
        "samples": total,
        "wall_s": round(time.monotonic() - started, 1),
        "fl_round_s": summary.fl_round_s,
        "shares": {name: round(n / total, 4) for name, n in counts.most_common()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default="site-1")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--rate", type=int, default=20, help="samples per second (py-spy falls behind above ~50)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/site_profile.json")
    parser.add_argument("--raw", type=Path, default=None, help="also keep py-spy's raw samples in this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = profile(args, Path(tmp))
    print(f"{args.site}: {result['samples']} samples of running threads at {args.rate} Hz, wall {result['wall_s']} s")
    for name, share in result["shares"].items():
        print(f"{100 * share:6.1f} %  {name}")
    if args.save:
        print(f"saved {record.save('site_profile', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
