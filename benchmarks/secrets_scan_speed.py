"""Speed of the secrets scan (``spleen-scan-secrets``) on a synthetic run folder, with real provisioned kits.

The folder: ``--logs-mb`` of text logs in 8 files (NVFlare-like lines with numbers, paths and base64-looking ids),
a ``--model-mb`` fake model (random bytes, as incompressible as real weights) and, with ``--tar-gz-mb``, a .tar.gz
of that many MB of logs (the cost of opening archives). The kits: 4 participants' keys, the root key in
state/cert.json and a client TenSEAL context (tests/unit/secure_kits.py). Prints the best of ``--repeat`` scans
(files cached in memory) as seconds and MB/s, and with ``--bomb-gib`` the CLI's time, exit code and peak memory on
a gzip bomb of that many GiB; ``--save`` also writes benchmarks/results/secrets_scan_speed.json.

Usage: ``.venv/bin/python benchmarks/secrets_scan_speed.py [--logs-mb 200] [--model-mb 100] [--tar-gz-mb 0]
[--bomb-gib 0]`` (``--workdir DIR`` keeps the folder for the next run)
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
import record  # noqa: E402
from secure_kits import provisioned_kits  # noqa: E402

from spleen_tools.run.kit_secrets import known_secrets  # noqa: E402
from spleen_tools.run.secrets_scan import ScanReport, scan  # noqa: E402

LOG_FILES = 8
# the CLI, then its own peak memory (VmHWM: ru_maxrss would count the benchmark's pages forked into the child)
_CLI_WITH_PEAK = (
    "import re, sys; from spleen_tools.cli.scan_secrets import main; code = main(sys.argv[1:]); "
    "print(re.search(r'VmHWM:.*', open('/proc/self/status').read()).group(), file=sys.stderr); sys.exit(code)"
)


def log_text(mb: int, seed: int) -> bytes:
    """About ``mb`` MB of log lines; every line differs (numbers, ids) so nothing is unusually cheap to scan."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < mb * 1_000_000:
        token = base64.b64encode(rng.randbytes(12)).decode()
        line = (
            f"2024-05-{rng.randint(1, 28):02d} 12:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
            f" - ClientRunner - INFO - [identity=site-{rng.randint(1, 3)}, run={token}, peer=localhost,"
            f" task_name=train, task_id={rng.getrandbits(64):016x}]: round {rng.randint(0, 99)} loss "
            f"{rng.random():.6f} dice {rng.random():.4f} /workspace/site-1/{token}/app/custom\n"
        ).encode()
        lines.append(line)
        size += len(line)
    return b"".join(lines)


def make_run_dir(root: Path, logs_mb: int, model_mb: int, tar_gz_mb: int) -> None:
    (root / "logs").mkdir(parents=True)
    for i in range(LOG_FILES):
        (root / "logs" / f"log_{i}.txt").write_bytes(log_text(logs_mb // LOG_FILES, seed=i))
    (root / "model.pt").write_bytes(os.urandom(model_mb * 1_000_000))
    if tar_gz_mb:  # an exported run: logs in a .tar.gz
        with tarfile.open(root / "export.tar.gz", "w:gz", compresslevel=6) as tar:
            for i in range(4):
                data = log_text(tar_gz_mb // 4, seed=100 + i)
                info = tarfile.TarInfo(f"export/logs/log_{i}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def timed_scans(root: Path, secrets: list, repeat: int) -> tuple[list[float], list[float], ScanReport]:
    times, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        report = scan([root], secrets)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu, report


def bomb_scan(work: Path, gib: int) -> dict:
    """The CLI on a gzip bomb of ``gib`` GiB (concatenated members of 1 MiB of zeros): time, exit code, peak RSS."""
    bomb = work / "bomb" / "run.log.gz"
    bomb.parent.mkdir(exist_ok=True)
    bomb.write_bytes(gzip.compress(bytes(1 << 20), compresslevel=9) * (gib << 10))
    cli = [sys.executable, "-c", _CLI_WITH_PEAK, str(bomb.parent), "--kits", str(work / "ws")]
    start = time.perf_counter()
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    *errors, peak = done.stderr.splitlines()
    peak_mb = int(peak.split()[1]) / 1024  # "VmHWM: <kB> kB"
    print(
        f"bomb: {bomb.stat().st_size / 1e6:.1f} MB file, {gib} GiB unpacked: exit {done.returncode} in {wall:.1f} s, "
        f"peak RSS {peak_mb:.0f} MB: {' '.join(errors)}"
    )
    return {"bomb_gib": gib, "bomb_exit": done.returncode, "bomb_s": round(wall, 1), "bomb_peak_rss_mb": round(peak_mb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs-mb", type=int, default=200)
    parser.add_argument("--model-mb", type=int, default=100)
    parser.add_argument("--tar-gz-mb", type=int, default=0, help="also a .tar.gz holding this many MB of logs")
    parser.add_argument("--bomb-gib", type=int, default=0, help="also the CLI on a gzip bomb of this many GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/secrets_scan_speed.json")
    parser.add_argument("--workdir", type=Path, help="keep the kits and the folder here, reuse them if there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        if not (work / "ws").is_dir():
            provisioned_kits(work / "ws")
            make_run_dir(work / "run", args.logs_mb, args.model_mb, args.tar_gz_mb)
        secrets = known_secrets([work / "ws"])
        on_disk = sum(p.stat().st_size for p in (work / "run").rglob("*") if p.is_file())
        times, cpu, report = timed_scans(work / "run", secrets, args.repeat)
        assert report.clean, report.findings + report.unchecked
        bomb = bomb_scan(work, args.bomb_gib) if args.bomb_gib else {}
    best = min(times)
    result = {
        "logs_mb": args.logs_mb,
        "model_mb": args.model_mb,
        "tar_gz_mb": args.tar_gz_mb,
        "files": report.files,
        "bytes_on_disk": on_disk,
        "secrets": len(secrets),
        "needles": sum(len(s.needles) for s in secrets),
        "scan_s": [round(t, 2) for t in times],
        "best_s": round(best, 2),
        "best_cpu_s": round(min(cpu), 2),
        "mb_per_s": round(on_disk / 1e6 / best),
        **bomb,
    }
    print(
        f"scanned {report.files} files, {on_disk / 1e6:.0f} MB on disk, {result['secrets']} secrets "
        f"({result['needles']} needles): best {best:.2f} s of {args.repeat} ({result['mb_per_s']} MB/s), "
        f"CPU {min(cpu):.2f} s"
    )
    if args.save:
        print(record.save("secrets_scan_speed", result))


if __name__ == "__main__":
    main()
