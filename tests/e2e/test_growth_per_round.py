"""A short soak in CI: 30 rounds of the one command on POC (``benchmarks/soak.py``'s run and fits), and bounds on
what may grow per round, fitted over rounds 11-29 (about 3 minutes on 2 cores; the 200-round soak is a benchmark).
The last round is left out: its sample races the job's end, whose final and cross-site models land in the run
directory (seen once: 150 MB at round 20, 225 MB at round 30, a 1.35 MB-a-round fit from that one point).

The bounds come from the two 200-round soaks in ``docs/BENCHMARKS.md`` (any 20-round window of them) with a margin,
and sit well below what one leaked copy of the model per round (19 MB) would add: resident memory of the server and
of each site (at most 2.3 MB a round in any window, noise: it swings by up to 150 MB between rounds; this short
run's server fit 5.2 MB a round once on an Intel Xeon, while its threads still climbed) under 10 MB a round; open
descriptors (0.01 at most) under 0.1, so one leaked per round fails; the run directory (0.27 at most) under 1 MB a
round. Threads are not bounded here: NVFlare's streaming keeps a timer thread per finished stream for its retry
timeout, so they climb for the first minutes whatever the number of rounds (the soak section).
"""

from __future__ import annotations

import sys

from conftest import REPO_ROOT, assert_nothing_left

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import soak  # noqa: E402

ROUNDS, WARMUP = 30, 10
RSS_MB_PER_ROUND, FDS_PER_ROUND, DISK_MB_PER_ROUND = 10.0, 0.1, 1.0


def test_nothing_grows_round_by_round_beyond_its_bound(tmp_path):
    result = soak.run_soak(ROUNDS, WARMUP, tmp_path / "runs", echo=print)
    assert [s["round"] for s in result["samples"]] == list(range(1, ROUNDS + 1)), "a sample after every round"
    growth = soak.growth(result["samples"][:-1], WARMUP)  # not the last round: the job's end writes its models
    for who in ("server", *soak.SITES):
        assert growth[f"{who}.rss_mb"]["per_round"] < RSS_MB_PER_ROUND, (who, growth[f"{who}.rss_mb"])
        assert abs(growth[f"{who}.fds"]["per_round"]) < FDS_PER_ROUND, (who, growth[f"{who}.fds"])
        assert result["last"][who]["rss_mb"] > 0, f"{who} was not measured"
    assert growth["disk_run_mb"]["per_round"] < DISK_MB_PER_ROUND, growth["disk_run_mb"]
    print({name: fit["per_round"] for name, fit in growth.items()})
    assert_nothing_left((tmp_path / "runs" / "latest").resolve())
