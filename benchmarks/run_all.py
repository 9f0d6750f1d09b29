"""Run every benchmark, record its JSON in benchmarks/results/ and regenerate docs/BENCHMARKS.md.

Steps, in this order (each is a command of its own; BENCHMARKS.md names it beside its figures):
  validity      spleen-bench validity, IID and non-IID, four FL methods, seeds 0 and 1 (about 75 min on 2 cores),
                then save_validity.py (the phase and SCAFFOLD studies are commands of their own: BENCHMARKS.md
                names them)
  round_cost    the one command at the demo's settings and at the job's own local epochs, round_cost.py on both
  throughput    throughput.py on the demo run: epochs in the FL client vs standalone ``monai.bundle run``
  profile       site_profile.py: what a site's job process spends its CPU on
  site_scaling  site_scaling.py: 2, 4, 8 and 16 sites on this machine, simulator and POC
  he_size       he_update_size.py: bytes and seconds of one HE round per layout
  he_round      he_round_time.py: the local job and the HE job on POC, same settings
  segment       segment_full_size.py: spleen-segment on one 512 x 512 x 120 scan with the demo run's model bundle
  he_malformed  he_malformed_update.py: what each malformed HE update of the security review costs its reader
  nifti_bombs   nifti_bomb_check.py: peak memory and time of the data check on NIfTI bombs (about 1 min)
  dp_utility    dp_utility.py: FedAvg with DP-SGD at epsilon 1, 3, 8, 30 and without DP, the IID, non-IID and
                contrast-phase data (about 65 min)
  gpu           gpu_check.py: the full bundle on CUDA, standalone and in FL, segmentation, an HE round (a GPU
                machine only: skipped, saying so, without CUDA; the figures recorded on a GPU stay)
then write_benchmarks_md.py. About 2 h 50 min on 2 cores (95 min without the validity study); nothing else may
run meanwhile (POC ports are fixed and the timings are the point).
Usage: ``.venv/bin/python benchmarks/run_all.py [--only a,b] [--skip a,b]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from spleen_tools.jobs import get_script_args, job_dir  # noqa: E402
from spleen_tools.paths import BIN_DIR, BUNDLE_NAME, REPO_ROOT, RUNS_DIR  # noqa: E402
from spleen_tools.run.settings import ExperimentSettings  # noqa: E402

STEPS = (
    "validity",
    "round_cost",
    "throughput",
    "profile",
    "site_scaling",
    "he_size",
    "he_round",
    "segment",
    "he_malformed",
    "nifti_bombs",
    "dp_utility",
    "gpu",
)
PYTHON = str(BIN_DIR / "python")


POLL_EXPERIMENT = HERE / "experiments" / "client_api_poll"  # its sitecustomize.py says what it does


def sh(cmd: list[str], env: dict[str, str] | None = None) -> None:
    shown = " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *cmd])
    print(f"$ {shown}", flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, env={**os.environ, **env} if env else None)


def one_command_run(runs_dir: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    """A run of the one command into ``runs_dir``; its run directory."""
    sh([PYTHON, "-m", "spleen_tools.cli.run_experiment", "--runs-dir", str(runs_dir), *args], env=env)
    return max(p.parent for p in runs_dir.glob("*/summary.json"))


class Benchmarks:
    def __init__(self, work: Path) -> None:
        self.work = work
        self._demo: Path | None = None

    def demo_run(self) -> Path:
        """The one command at its defaults (the demo), run once and shared by round_cost and throughput."""
        if self._demo is None:
            self._demo = one_command_run(self.work / "demo")
        return self._demo

    def validity(self) -> None:
        out = self.work / "validity"
        methods = ["--methods", "fedavg,fedprox,fedopt,fedbn", "--seeds", "0,1"]  # as recorded
        sh([str(BIN_DIR / "spleen-bench"), "validity", "--settings", "iid,noniid", *methods, "--out", str(out)])
        sh([PYTHON, str(HERE / "save_validity.py"), str(out)])

    def round_cost(self) -> None:
        demo = ExperimentSettings()
        own_epochs = get_script_args(job_dir("spleen_ct_segmentation_local"))["local_epochs"]
        rounds = str(max(2, demo.rounds * demo.local_epochs // int(own_epochs)))  # about the demo's epochs
        own = one_command_run(self.work / "own_epochs", "--rounds", rounds, "--local-epochs", own_epochs)
        poll_env = {"PYTHONPATH": str(POLL_EXPERIMENT), "SPLEEN_BENCH_CLIENT_API_POLL": "0.05"}
        poll = one_command_run(self.work / "client_api_poll", env=poll_env)
        labels = [
            f"demo: {demo.rounds} rounds x {demo.local_epochs} local epochs",
            f"job's own local epochs: {rounds} rounds x {own_epochs}",
            "experiment: the demo with NVFlare's in-process Client API polling every 0.05 s instead of 0.5 s",
        ]
        runs = [str(self.demo_run()), str(own), str(poll)]
        sh([PYTHON, str(HERE / "round_cost.py"), *runs, "--labels", *labels, "--save"])

    def throughput(self) -> None:
        sh([PYTHON, str(HERE / "throughput.py"), str(self.demo_run()), "--epochs", "10", "--save"])

    def profile(self) -> None:
        sh([PYTHON, str(HERE / "site_profile.py"), "--save"])

    def site_scaling(self) -> None:
        sh([PYTHON, str(HERE / "site_scaling.py"), "--save"])

    def he_size(self) -> None:
        sh([PYTHON, str(HERE / "he_update_size.py"), "--save"])

    def segment(self) -> None:
        bundle = self.demo_run() / "model_bundle" / BUNDLE_NAME
        sh([PYTHON, str(HERE / "segment_full_size.py"), "--bundle", str(bundle), "--save"])

    def he_round(self) -> None:
        sh([PYTHON, str(HERE / "he_round_time.py"), "--runs-dir", str(self.work / "he_round"), "--save"])

    def he_malformed(self) -> None:
        sh([PYTHON, str(HERE / "he_malformed_update.py"), "--save"])

    def nifti_bombs(self) -> None:
        sh([PYTHON, str(HERE / "nifti_bomb_check.py"), "--save"])

    def dp_utility(self) -> None:
        settings = ["--settings", "iid,noniid,phase"]
        sh([PYTHON, str(HERE / "dp_utility.py"), *settings, "--out", str(self.work / "dp_utility"), "--save"])

    def gpu(self) -> None:
        from spleen_tools.systems.base import cuda_device_count

        if not cuda_device_count():
            print("no CUDA device here: the GPU check is left out (its recorded figures stay in BENCHMARKS.md)")
            return
        sh([PYTHON, str(HERE / "gpu_check.py"), "--save"])


def _steps(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=_steps, default=list(STEPS), help="comma-separated steps to run")
    parser.add_argument("--skip", type=_steps, default=[], help="comma-separated steps to leave out")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/bench/all/<timestamp>")
    args = parser.parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    bench = Benchmarks((args.runs_dir or RUNS_DIR / "bench" / "all" / stamp).resolve())
    took = {}
    for step in [s for s in STEPS if s in args.only and s not in args.skip]:
        print(f"\n== {step}", flush=True)
        started = time.monotonic()
        getattr(bench, step)()
        took[step] = round(time.monotonic() - started)
    sh([PYTHON, str(HERE / "write_benchmarks_md.py")])
    print("\nseconds per step: " + ", ".join(f"{step} {s}" for step, s in took.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
