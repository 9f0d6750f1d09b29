"""``./run_experiment.sh --job stats`` on a real POC: NVFlare's statistics workflow over the sites' NIfTI cases.

15 tiny synthetic cases split 8 / 7 between the sites, and the job's minimum count set to 8 cases: site-1 sends
its figures and histograms, site-2 (7 cases) its counts only. The run writes stats.json, stats.png and the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import REPO_ROOT, assert_nothing_left, runner_cmd
from PIL import Image

from spleen_tools.run.stats_report import STATS_FILE, STATS_PNG


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("stats_runs")
    extra = ["--job", "stats", "--synthetic-cases", "15", "--synthetic-shape", "64x64x16", "--stats-min-count", "8"]
    t0 = time.monotonic()
    proc = subprocess.run(
        runner_cmd(runs_dir, *extra, "--timeout", "600"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=700,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    run_dir = (runs_dir / "latest").resolve()
    output = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    return proc, run_dir, output, time.monotonic() - t0


def test_the_run_completes_with_its_table(stats_run):
    proc, _, output, _ = stats_run
    assert proc.returncode == 0, output
    assert "job: " in proc.stdout and "(statistics)" in proc.stdout
    table = proc.stdout[proc.stdout.index("federated statistics") :]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[3:6]}
    assert rows["site-1"][0] == "8" and "withheld" not in rows["site-1"], table
    assert rows["site-2"][0] == "7" and set(rows["site-2"][1:]) == {"withheld"}, table
    assert rows["pooled"][0] == "8", table  # the pooled means are site-1's own


def test_a_site_under_the_minimum_count_sends_its_counts_only(stats_run):
    _, run_dir, output, _ = stats_run
    stats = json.loads((run_dir / STATS_FILE).read_text())
    for feature, dataset in (("spleen_hu", "intensity"), ("body_hu", "intensity"), ("spleen_volume_ml", "cases")):
        assert stats[feature]["count"]["site-1"][dataset] == 8
        assert stats[feature]["count"]["site-2"][dataset] == 7
        for statistic in ("sum", "mean", "stddev", "histogram"):
            assert "site-2" not in stats[feature][statistic], (feature, statistic, output)
            assert "site-1" in stats[feature][statistic], (feature, statistic)


def test_site_figures_are_those_of_its_cases(stats_run):
    """site-1's histograms hold its voxels, its spacing is the synthetic scans' (0.8 x 0.8 x 5 mm), the spleen
    (drawn at 100-130 HU plus noise) averages in that range, the body (fat, soft tissue, bone) much lower."""
    _, run_dir, _, _ = stats_run
    stats = json.loads((run_dir / STATS_FILE).read_text())

    def mean(feature, dataset="cases"):
        return stats[feature]["mean"]["site-1"][dataset]

    assert (mean("spacing_x_mm"), mean("spacing_y_mm"), mean("spacing_z_mm")) == pytest.approx((0.8, 0.8, 5.0))
    assert mean("size_x") == 64 and 12 <= mean("size_z") <= 20
    assert 100 <= mean("spleen_hu", "intensity") <= 130 and mean("body_hu", "intensity") < 60
    spleen_bins = stats["spleen_hu"]["histogram"]["site-1"]["intensity"]
    assert len(spleen_bins) == 50 and (spleen_bins[0][0], spleen_bins[-1][1]) == (-100, 400)
    voxels = sum(b[2] for b in spleen_bins)
    volume_ml = stats["spleen_volume_ml"]["sum"]["site-1"]["cases"]
    assert voxels == pytest.approx(volume_ml * 1000 / (0.8 * 0.8 * 5.0), rel=1e-3)  # every spleen voxel, once
    assert sum(b[2] for b in stats["size_z"]["histogram"]["site-1"]["cases"]) == 8  # per-case bins count cases


def test_the_png_and_nothing_left(stats_run):
    proc, run_dir, output, _ = stats_run
    assert proc.returncode == 0, output
    with Image.open(run_dir / STATS_PNG) as png:
        assert png.size[0] >= 1000 and png.size[1] >= 600
    assert not (run_dir / "mlflow").exists(), "the statistics job starts no MLflow server"
    assert_nothing_left(run_dir)
