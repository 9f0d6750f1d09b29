"""benchmarks/gpu_check.py: its dry run on the CPU does every part of the GPU check (bundle standalone, the local job
in the real simulator, segmentation, an HE round), so the check still runs when a GPU machine comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SITES = ("site-1", "site-2")


def run_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=280, env=env
    )


@pytest.mark.timeout(300)
def test_the_dry_run_measures_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_check("--dry-run", "--json", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["plan"]["quick"] is True
    for site in SITES:
        alone, fl = result["standalone"][site], result["in_fl"][site]
        assert alone["epochs"] == result["plan"]["standalone_epochs"] and alone["epoch_s"] > 0, alone
        assert fl["device"] == "cpu" and fl["epoch_s"] > 0, fl  # the site's own "device" line, read from its log
        assert fl["gpu_peak_mb"] is None and alone["gpu_peak_mb"] is None  # no GPU figures made up on a CPU
        assert len(fl["work_s"]) == result["plan"]["rounds"], fl
    rounds = result["in_fl"]["server_round_s"]
    assert len(rounds) == result["plan"]["rounds"] and all(t > 0 for t in rounds), rounds
    overhead = result["in_fl"]["round_overhead_s"]
    assert len(overhead) == len(rounds) and all(0 <= o < t for o, t in zip(overhead, rounds, strict=True)), overhead
    assert result["segment"]["shape"] == list(result["plan"]["segment_shape"]) and result["segment"]["seconds"] > 0
    assert (tmp_path / "work" / "segmented" / "spleen_1_seg.nii.gz").is_file()
    he = result["he_round"]
    assert 1.9 < he["ours"]["update_bytes"] / he["plain"]["update_bytes"] < 2.1, he  # the packed layout's 2x
    assert he["ours"]["max_err"] < 1e-3 and he["ours"]["encrypt_s"] > 0, he
    assert "site-1: epoch standalone" in proc.stdout and "HE round" in proc.stdout


def test_without_a_gpu_it_says_so_in_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = run_check(env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "no CUDA device here: run it on a GPU machine, or give --dry-run to check it on the CPU"
    ]


def test_the_benchmarks_page_renders_the_recorded_gpu_figures():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import write_benchmarks_md

    record = json.loads((REPO / "benchmarks" / "results" / "gpu_check.json").read_text())
    text = "\n".join(write_benchmarks_md.gpu_check(record))
    assert "## On a GPU (the GPU check)" in text
    for site in SITES:
        row = next(line for line in text.splitlines() if line.startswith(f"| {site} |"))
        assert str(record["result"]["standalone"][site]["epoch_s"]) in row
    assert f"{record['result']['segment']['seconds']} s" in text
