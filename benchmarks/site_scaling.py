"""Round time and server memory for 2, 4 and 8 sites on one machine (tiny data), through the one command.

Each run is ``run_experiment`` on POC with N sites, tiny synthetic data (2 cases per site and a few more),
``--rounds`` rounds x 1 local epoch. While it runs, the server's memory (resident set of the server process and
its job process, from the run's ``pids.json``) is sampled every half second; round times come from the run's
``summary.json`` (the server's own round start/end, and the slowest site's work).

Usage: ``.venv/bin/python benchmarks/site_scaling.py [--sites 2 4 8] [--rounds 2] [--save]``.
Nothing else may run on the machine meanwhile (POC ports are fixed; the timings are the point).
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

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_tools.paths import BIN_DIR, REPO_ROOT  # noqa: E402
from spleen_tools.procs import PidFile, ProcessRef  # noqa: E402


class ServerMemory(threading.Thread):
    """Peak resident memory of the server process tree of the run whose pids.json appears under ``runs_dir``."""

    def __init__(self, runs_dir: Path) -> None:
        super().__init__(daemon=True)
        self.runs_dir = runs_dir
        self.peak_mb = 0.0
        self.stop = threading.Event()

    def _server(self) -> psutil.Process | None:
        for pid_file in self.runs_dir.glob("*/pids.json"):
            rec = (PidFile(pid_file).read().get("poc") or {}).get("processes", {}).get("server")
            if rec:
                return ProcessRef.from_json(rec).process()
        return None

    def run(self) -> None:
        server = None
        while not self.stop.wait(0.5):
            server = server or self._server()
            if server is None:
                continue
            try:
                tree = [server, *server.children(recursive=True)]
                self.peak_mb = max(self.peak_mb, sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                continue


def one_run(sites: int, rounds: int, runs_dir: Path) -> dict:
    cmd = [str(BIN_DIR / "python"), "-m", "spleen_tools.cli.run_experiment", "--sites", str(sites)]
    cmd += ["--rounds", str(rounds), "--local-epochs", "1", "--quick", "--synthetic-cases", str(2 * sites + 2)]
    cmd += ["--synthetic-shape", "80x80x20", "--runs-dir", str(runs_dir), "--timeout", "1500"]
    memory = ServerMemory(runs_dir)
    memory.start()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1600)
    wall = time.monotonic() - t0
    memory.stop.set()
    memory.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{sites} sites: exit {proc.returncode}: {proc.stderr[-1000:]}")
    summary = json.loads(next(runs_dir.glob("*/summary.json")).read_text())
    return {
        "sites": sites,
        "wall_s": round(wall, 1),
        "fl_round_s": summary["fl_round_s"],
        "site_work_s": summary["site_work_s"],
        "server_peak_mb": round(memory.peak_mb, 1),
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
