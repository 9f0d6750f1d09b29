"""The GPU check: the full bundle on CUDA, standalone and inside the FL client, full-size segmentation, one HE round.

On a CUDA machine it finishes in a few minutes (target: under 8) and measures, on synthetic scans of about
real size after resampling (scanned 320 x 320 x 64 at 1.2 x 1.2 x 5 mm):
1. standalone: the full bundle (96^3 patches, AMP) run by MONAI's own ``monai.bundle.run``, two sites' bundles
   side by side on the one GPU, as in the FL run: median epoch time, peak GPU memory per process;
2. in FL: the local job in the NVFlare simulator, 2 sites sharing that GPU (each site trains in its own client
   process): median epoch time from the sites' logs, each site's device and peak GPU memory (its round lines),
   the server's round time and the round overhead (round time minus the slowest site's own work);
3. segmentation of one full-size CT (512 x 512 x 120) with ``spleen-segment``'s code on the GPU;
4. one HE round of the full-size model through our HE components (encrypt, aggregate, decrypt; CPU work).
``--dry-run`` does all of it on the CPU, small: scans of 64 x 64 x 24, the CPU-quick bundle override, one round;
the fast tests run it so that the check still works when a GPU machine comes. Prints figures; ``--save`` writes
``benchmarks/results/gpu_check.json`` for ``docs/BENCHMARKS.md`` (a dry run is never saved).

Usage: ``python benchmarks/gpu_check.py [--dry-run] [--save] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402
from throughput import epoch_times  # noqa: E402

from spleen_tools.data import make_site_datalists, make_synthetic_dataset  # noqa: E402
from spleen_tools.jobs import QUICK_OVERRIDE, TRAIN_CONFIG, JobSettings, prepare_job  # noqa: E402
from spleen_tools.paths import BUNDLE_SRC  # noqa: E402
from spleen_tools.run.progress import Progress, parse_event  # noqa: E402
from spleen_tools.systems.base import participant_env  # noqa: E402
from spleen_tools.systems.simulator import run_simulator  # noqa: E402

SITES = ("site-1", "site-2")
SKIP_EPOCHS = 1  # each side's first epoch (caching, CUDA start-up) is left out of the median


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the real one on CUDA, or the dry run on the CPU."""

    scan_shape: tuple[int, int, int]
    scan_spacing: tuple[float, float, float]
    cases_per_site: int
    standalone_epochs: int
    rounds: int
    local_epochs: int
    quick: bool
    segment_shape: tuple[int, int, int]


FULL = Plan((320, 320, 64), (1.2, 1.2, 5.0), 10, 6, 3, 2, False, (512, 512, 120))
DRY = Plan((64, 64, 24), (0.8, 0.8, 5.0), 3, 2, 1, 1, True, (96, 96, 24))


class GpuBusy:
    """Mean and peak SM utilization of GPU 0 while a phase runs (NVML, sampled every 0.5 s): how busy the check
    keeps the GPU. None without NVML (no NVIDIA driver, or nvidia-ml-py missing)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:
            self._read = None

    def __enter__(self) -> GpuBusy:
        if self._read:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append(int(self._read()))

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def figures(self) -> dict | None:
        if not self.samples:
            return None
        return {"sm_percent_mean": round(statistics.mean(self.samples), 1), "sm_percent_max": max(self.samples)}


def bundle_configs(plan: Plan) -> list[str]:
    return [TRAIN_CONFIG] + ([QUICK_OVERRIDE] if plan.quick else [])


def make_data(work: Path, plan: Plan) -> tuple[Path, dict[str, Path]]:
    started = time.monotonic()
    data = make_synthetic_dataset(
        work / "data",
        num_train=plan.cases_per_site * len(SITES),
        num_test=0,
        shape=plan.scan_shape,
        spacing=plan.scan_spacing,
        seed=5,
    )
    lists = make_site_datalists(data, num_sites=len(SITES))
    print(f"data: {plan.cases_per_site} cases per site, {plan.scan_shape} voxels, {time.monotonic() - started:.0f} s")
    return data, lists


_STANDALONE = """
import json, sys, torch
from monai.bundle import run
bundle, override = sys.argv[1], sys.argv[2]
configs = [f"{bundle}/{c}" for c in sys.argv[3:]] + [override]
run(run_id="run", config_file=configs, meta_file=f"{bundle}/configs/metadata.json",
    logging_file=f"{bundle}/configs/logging.conf")
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print("GPU_PEAK_MB", json.dumps(peak))
"""


def standalone(work: Path, plan: Plan, lists: dict[str, Path]) -> dict:
    """Both sites' bundles with MONAI's own runner, side by side, each with the FL run's thread share."""
    bundle = work / "standalone_bundle"
    shutil.copytree(BUNDLE_SRC, bundle, dirs_exist_ok=True)
    shutil.copytree(BUNDLE_SRC.parent / "overrides", work / "overrides", dirs_exist_ok=True)
    env = participant_env(sites=len(SITES))
    procs = {}
    for site in SITES:
        datalist = json.loads(lists[site].read_text())
        override = work / f"standalone_{site}.json"
        override.write_text(
            json.dumps(
                {
                    "bundle_root": str(work / f"standalone_{site}"),
                    "epochs": plan.standalone_epochs,
                    "train#dataset#data": datalist["training"],
                    "validate#dataset#data": datalist["validation"],
                }
            )
        )
        cmd = [sys.executable, "-c", _STANDALONE, str(bundle), str(override), *bundle_configs(plan)]
        procs[site] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.monotonic()
    outputs = {site: proc.communicate(timeout=1200)[0] for site, proc in procs.items()}
    result = {"wall_s": round(time.monotonic() - started, 1)}
    for site, proc in procs.items():
        if proc.returncode != 0:
            raise SystemExit(f"standalone {site} failed (exit {proc.returncode}):\n{outputs[site][-3000:]}")
        peak = re.search(r"^GPU_PEAK_MB (.+)$", outputs[site], re.M)
        times = epoch_times(outputs[site])
        result[site] = {
            "epoch_s": median(times),
            "epochs": len(times),
            "gpu_peak_mb": round(json.loads(peak.group(1))) if peak and peak.group(1) != "null" else None,
        }
    return result


def median(times: list[float]) -> float | None:
    kept = times[SKIP_EPOCHS:] or times
    return round(statistics.median(kept), 2) if kept else None


def read_logs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("log.txt")))


def in_fl(work: Path, plan: Plan, data: Path) -> dict:
    """The local job in the simulator, 2 sites on the one GPU; what the sites' and the server's logs say."""
    settings = JobSettings(
        rounds=plan.rounds,
        local_epochs=plan.local_epochs,
        min_clients=len(SITES),
        quick=plan.quick,
        tracking="tensorboard",
        ship_code=True,
    )
    job = prepare_job("spleen_ct_segmentation_local", work / "jobs", settings)
    started = time.monotonic()
    sim = run_simulator(job, work / "simulator", len(SITES), data, timeout=1200)
    wall = round(time.monotonic() - started, 1)
    log = sim.log_path.read_text(errors="replace")
    if sim.returncode != 0:
        raise SystemExit(f"the simulator failed (exit {sim.returncode}):\n{log[-3000:]}")
    # what the one command would follow: the sites' progress lines and the server's round marks (Progress dedupes)
    site_logs = {site: read_logs(sim.workspace / site) for site in SITES}
    progress = Progress(list(SITES), plan.rounds)
    for line in "\n".join([log, *site_logs.values()]).splitlines():
        if event := parse_event(line):
            progress.add(event)
    result: dict = {"wall_s": wall, "server_round_s": progress.fl_round_times()}
    for site in SITES:
        result[site] = {
            "device": progress.devices.get(site),
            "epoch_s": median(epoch_times(site_logs[site])),
            "work_s": [progress.per_round[r][site].get("work_s") for r in sorted(progress.per_round)],
            "gpu_peak_mb": progress.gpu_peak_mb.get(site),
        }
    result["round_overhead_s"] = [
        round(t - w, 2) for t, w in zip(result["server_round_s"], progress.site_work_times(), strict=False)
    ]
    result["global_model"] = str(sim.global_model_path)
    return result


def segment_full_size(work: Path, plan: Plan, checkpoint: Path, device: str) -> dict:
    """One full-size CT through ``spleen-segment``'s code, with the FL run's global model."""
    from spleen_tools.segment.segmenter import segment

    bundle = work / "model_bundle"
    shutil.copytree(BUNDLE_SRC, bundle, dirs_exist_ok=True)
    (bundle / "models").mkdir(exist_ok=True)
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.save(weights.get("model", weights), bundle / "models" / "model.pt")
    scans = make_synthetic_dataset(
        work / "full_size", num_train=1, num_test=0, shape=plan.segment_shape, spacing=(0.8, 0.8, 2.5), seed=9
    )
    scan = next((scans / "imagesTr").iterdir())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    (row,) = segment(bundle, scan, work / "segmented", out=lambda _line: None, device=device)
    seconds = round(time.monotonic() - started, 1)
    peak = round(torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None
    return {"shape": list(plan.segment_shape), "device": device, "seconds": seconds, "gpu_peak_mb": peak}


def he_round() -> dict:
    """One FedAvg round of the full-size model through our HE components (CKKS, provisioning's parameters)."""
    import he_update_size as he

    logging.disable(logging.CRITICAL)  # components outside a running system log about the missing engine
    he.numpy_decomposers.register()
    he.he_decomposers.register()
    state = {k: v.numpy() for k, v in he.build_network(BUNDLE_SRC).state_dict().items()}
    client_ctx, server_ctx = he.contexts()
    rows = {}
    for layout in ("plain", "ours"):
        with contextlib.redirect_stdout(io.StringIO()):  # the filters' [spleen-he] lines
            row = he.run_round(layout, state, client_ctx, server_ctx)
        rows[layout] = {
            k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if isinstance(v, int | float)
        }
    logging.disable(logging.NOTSET)
    return rows


def gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False, "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "gpu": props.name,
        "gpu_memory_gb": round(props.total_memory / 1e9, 1),
        "gpus": torch.cuda.device_count(),
    }


def report(result: dict) -> None:
    alone, fl, seg, he = result["standalone"], result["in_fl"], result["segment"], result["he_round"]
    for site in SITES:
        ratio = (
            round(alone[site]["epoch_s"] / fl[site]["epoch_s"], 2)
            if alone[site]["epoch_s"] and fl[site]["epoch_s"]
            else None
        )
        print(
            f"{site}: epoch standalone {alone[site]['epoch_s']} s, in the FL client {fl[site]['epoch_s']} s "
            f"(standalone / FL = {ratio}); trains on {fl[site]['device']}; peak GPU memory standalone "
            f"{alone[site]['gpu_peak_mb']} MB, in FL {fl[site]['gpu_peak_mb']} MB"
        )
    print(f"GPU busy (SM %, mean/max): standalone {alone.get('gpu_busy')}, in FL {fl.get('gpu_busy')}")
    print(
        f"server round times {fl['server_round_s']} s; round overhead (round - slowest site's work) "
        f"{fl['round_overhead_s']} s"
    )
    print(
        f"segmentation of one {'x'.join(map(str, seg['shape']))} CT on {seg['device']}: {seg['seconds']} s, "
        f"peak GPU memory {seg['gpu_peak_mb']} MB"
    )
    ours, plain = he["ours"], he["plain"]
    print(
        f"HE round (2 sites, CPU work): update {ours['update_bytes'] / 1e6:.1f} MB "
        f"({ours['update_bytes'] / plain['update_bytes']:.2f}x plain), encrypt {ours['encrypt_s']} s, aggregate "
        f"{ours['aggregate_s']} s, decrypt {ours['decrypt_s']} s, round work {ours['round_s']} s "
        f"(plain {plain['round_s']} s)"
    )
    print(f"total {result['total_s']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, small: checks the check, measures nothing")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/gpu_check.json (not a dry run)")
    parser.add_argument("--work", type=Path, default=None, help="keep the work here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device here: run it on a GPU machine, or give --dry-run to check it on the CPU")
    plan = DRY if args.dry_run else FULL
    device = "cuda" if cuda and not args.dry_run else "cpu"
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        work.mkdir(parents=True, exist_ok=True)
        env_backup = os.environ.get("CUDA_VISIBLE_DEVICES")
        if args.dry_run:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the bundle's device follows CUDA's presence
        try:
            result: dict = {"dry_run": args.dry_run, "plan": asdict(plan), "machine": gpu_info()}
            data, lists = make_data(work, plan)
            with GpuBusy() as busy:
                result["standalone"] = standalone(work, plan, lists)
            result["standalone"]["gpu_busy"] = busy.figures()
            print(f"standalone: {json.dumps(result['standalone'])}", flush=True)
            with GpuBusy() as busy:
                result["in_fl"] = in_fl(work, plan, data)
            result["in_fl"]["gpu_busy"] = busy.figures()
            print(f"in FL: {json.dumps(result['in_fl'])}", flush=True)
            result["segment"] = segment_full_size(work, plan, Path(result["in_fl"]["global_model"]), device)
            result["he_round"] = he_round()
        finally:
            if args.dry_run:
                if env_backup is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = env_backup
    result["total_s"] = round(time.monotonic() - started, 1)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.save and not args.dry_run:
        print(f"saved {record.save('gpu_check', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
