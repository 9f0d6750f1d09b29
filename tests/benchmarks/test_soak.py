"""benchmarks/soak.py's arithmetic and sampling (the soak itself is a benchmark command, not a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # noqa: E402


def test_growth_per_round_is_the_fitted_slope_after_the_warmup():
    samples = [
        {
            "round": r,
            "server": {"rss_mb": 100.0 + (50 if r <= 3 else 2 * r), "fds": 40, "threads": 20},
            **{site: {"rss_mb": 200.0, "fds": 30 + r, "threads": 10} for site in soak.SITES},
            "disk_run_mb": 5.0 * r,
            "disk_mlflow_mb": 1.0,
        }
        for r in range(1, 21)
    ]
    growth = soak.growth(samples, warmup=3)  # the warm-up jump left out
    assert growth["server.rss_mb"] == {"per_round": 2.0, "r2": 1.0}
    assert growth["site-1.fds"]["per_round"] == 1.0 and growth["server.fds"]["per_round"] == 0.0
    assert growth["disk_run_mb"]["per_round"] == 5.0
    assert soak.fit([1, 2], [1.0, 2.0]) == {"per_round": None, "r2": None}  # too few rounds to fit


def test_a_process_tree_is_sampled_with_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alone = soak.tree_usage(child.pid)
        with_child = soak.tree_usage(os.getpid())
        assert alone["threads"] >= 1 and alone["rss_mb"] > 0
        assert with_child["rss_mb"] > alone["rss_mb"] and with_child["fds"] >= alone["fds"]
    finally:
        child.kill()
        child.wait()
    assert soak.tree_usage(child.pid) == {"rss_mb": 0.0, "fds": 0, "threads": 0}  # gone: nothing to count
