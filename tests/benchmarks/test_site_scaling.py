"""benchmarks/site_scaling.py's arithmetic: the per-site fit, the memory guard that skips a POC run too big for
the machine, and the BENCHMARKS section from the recorded result (the runs themselves are a benchmark command)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import site_scaling  # noqa: E402
import write_benchmarks_md  # noqa: E402


def _run(sites: int, mb_per_site: float = 1000.0) -> dict:
    rounds = [5.0 * sites, 0.5 * sites + 1.0, 0.5 * sites + 1.0]
    return {"sites": sites, "fl_round_s": rounds, "site_work_s": [1.0] * 3, "total_peak_mb": mb_per_site * sites + 700}


def test_the_fit_is_per_site_and_leaves_round_zero_out():
    fit = site_scaling.fits([_run(2), _run(4), _run(8)])
    assert fit["round_s"] == {"per_site": 0.5, "intercept": 1.0, "r2": 1.0}  # round 0's start-up not in it
    assert fit["total_peak_mb"] == {"per_site": 1000.0, "intercept": 700.0, "r2": 1.0}
    assert site_scaling.line_fit([2], [1.0]) is None


def test_a_run_the_fitted_memory_says_will_not_fit_is_predicted_from_the_smaller_ones():
    assert site_scaling.predicted_mb([_run(2)], 16) is None  # one run: no line yet, so the run is tried
    predicted = site_scaling.predicted_mb([_run(2), _run(4), {"sites": 8, "skipped": "too big"}], 64)
    assert predicted == 1000.0 * 64 + 700


def test_the_recorded_result_renders_with_both_systems_and_their_fits():
    record = json.loads((BENCHMARKS / "results" / "site_scaling.json").read_text())
    text = "\n".join(write_benchmarks_md.site_scaling(record))
    assert "### Simulator" in text and "### POC (the one command)" in text
    for system in record["result"]["systems"].values():
        for run in system["runs"]:
            assert f"| {run['sites']} | {run['fl_round_s']} |" in text or run.get("skipped")
    assert text.count("Least-squares line against the number of sites") == len(record["result"]["systems"])
