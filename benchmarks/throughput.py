"""Training throughput inside the FL client vs the same bundle run standalone, at the same thread count.

For a finished run of the one command, each site's epoch times come from its job log (the bundle's
``SupervisedTrainer ... Epoch[N] Complete. Time taken``). The standalone side runs ``python -m monai.bundle run``
on the same bundle copy, override files and site datalists (one override file with the site's lists and the
epoch count), all sites side by side as in the FL run, each with the same ``OMP_NUM_THREADS`` share. The ratio is
standalone / in-FL median epoch time (1.0 = no cost for running inside NVFlare). The first epochs of each side
(data caching, start-up) are left out.

Usage: ``.venv/bin/python benchmarks/throughput.py runs/latest [--epochs 8]`` (prints figures, writes
``throughput.json`` into the run directory). Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_tools.jobs import QUICK_OVERRIDE, TRAIN_CONFIG  # noqa: E402
from spleen_tools.paths import BIN_DIR  # noqa: E402
from spleen_tools.run.summary import RunSummary  # noqa: E402
from spleen_tools.systems.base import participant_env  # noqa: E402

_EPOCH = re.compile(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")
SKIP = 2  # first epochs of each side: caching and start-up


def epoch_times(text: str) -> list[float]:
    return [int(h) * 3600 + int(m) * 60 + float(s) for _, h, m, s in _EPOCH.findall(text)]


def in_fl_times(run_dir: Path, summary: RunSummary) -> dict[str, list[float]]:
    logs = {s: Path(summary.paths[f"log_{s}"]) / summary.job_id / "log.txt" for s in summary.sites}
    return {site: epoch_times(log.read_text(errors="replace")) for site, log in logs.items()}


def standalone_times(run_dir: Path, summary: RunSummary, epochs: int) -> dict[str, list[float]]:
    """All sites' bundles at once, each in its own process with the FL run's thread share."""
    bundle = next((run_dir / "jobs").glob("*/app/config/spleen_ct_segmentation"))
    configs = [str(bundle / TRAIN_CONFIG)] + ([str(bundle / QUICK_OVERRIDE)] if summary.quick else [])
    env = participant_env(sites=len(summary.sites))
    procs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for site in summary.sites:
            lists = json.loads((run_dir / "datalists" / f"{site}.json").read_text())
            override = Path(tmp) / f"{site}.json"
            root = Path(tmp) / site
            override.write_text(
                json.dumps(
                    {
                        "bundle_root": str(root),
                        "epochs": epochs,
                        "train#dataset#data": lists["training"],
                        "validate#dataset#data": lists["validation"],
                    }
                )
            )
            cmd = [
                str(BIN_DIR / "python"),
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                str([*configs, str(override)]),
            ]
            cmd += [
                "--meta_file",
                str(bundle / "configs" / "metadata.json"),
                "--logging_file",
                str(bundle / "configs" / "logging.conf"),
            ]
            procs[site] = subprocess.Popen(
                cmd, env=env, cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        outputs = {site: proc.communicate(timeout=1800)[0] for site, proc in procs.items()}
    for site, proc in procs.items():
        if proc.returncode != 0:
            raise RuntimeError(f"standalone {site} failed (exit {proc.returncode}): {outputs[site][-1500:]}")
    return {site: epoch_times(text) for site, text in outputs.items()}


def median_after_skip(times: list[float]) -> float | None:
    kept = times[SKIP:]
    return round(statistics.median(kept), 3) if kept else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run directory of the one command")
    parser.add_argument("--epochs", type=int, default=8, help="standalone epochs per site (default: 8)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/throughput.json")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    summary = RunSummary.load(run_dir)
    fl = in_fl_times(run_dir, summary)
    alone = standalone_times(run_dir, summary, args.epochs)
    result = {"run_dir": str(run_dir), "threads_per_site": participant_env(sites=len(fl))["OMP_NUM_THREADS"]}
    for site in summary.sites:
        fl_s, alone_s = median_after_skip(fl[site]), median_after_skip(alone[site])
        ratio = round(alone_s / fl_s, 3) if fl_s and alone_s else None
        result[site] = {"in_fl_epoch_s": fl_s, "standalone_epoch_s": alone_s, "throughput_ratio": ratio}
        print(
            f"{site}: epoch in the FL client {fl_s} s (median of {len(fl[site]) - SKIP}), standalone {alone_s} s "
            f"(median of {len(alone[site]) - SKIP}): throughput in FL / standalone = {ratio}"
        )
    (run_dir / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.save:
        print(f"saved {record.save('throughput', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
