"""The MLflow dashboard of a real run in headless Chromium: the URL the run prints opens the runs as charts, with
both sites' loss and Dice drawn; the runs page and each run's page name the sites' metrics.

Uses the store of the shared e2e run (tests/e2e/conftest.py). Chromium: Debian's ``/usr/bin/chromium``
(``apt-get install -y --no-install-recommends chromium``); without it the test skips, saying so.
Screenshots go to ``<run dir>/dashboard/``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import SITES

pytestmark = pytest.mark.browser

METRICS = ("val_mean_dice", "train_loss", "train_loss_epoch", "global_val_mean_dice")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    "--virtual-time-budget=60000",  # let the single-page app fetch and render before dumping
    "--run-all-compositor-stages-before-draw",
)
CHARTED = ("train_loss_epoch", "val_mean_dice", "global_val_mean_dice")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("headless Chromium not installed (apt-get install -y --no-install-recommends chromium)")
    return path


def _browse(chromium: str, url: str, screenshot: Path, raw: bool = False) -> str:
    """The page's rendered text (DOM dump, tags stripped; ``raw``: the DOM); a screenshot saved to ``screenshot``."""
    texts = []
    for action in ("--dump-dom", f"--screenshot={screenshot}"):
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            proc = subprocess.run(
                [chromium, *FLAGS, f"--user-data-dir={profile}", action, url],
                capture_output=True,
                text=True,
                timeout=180,
            )
        assert proc.returncode == 0, proc.stderr[-2000:]
        texts.append(proc.stdout)
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", texts[0], flags=re.S)
    if raw:
        return dom
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_dashboard_shows_runs_and_site_metrics(experiment_run, run_mlflow):
    chromium = _chromium()
    summary = experiment_run.summary
    experiment_id = summary["mlflow"]["experiment_id"]
    out_dir = experiment_run.run_dir / "dashboard"
    out_dir.mkdir(exist_ok=True)
    base = f"{run_mlflow.url}/#/experiments/{experiment_id}"

    runs_page = _browse(chromium, f"{base}/runs", out_dir / "runs.png")
    assert summary["job_name"] in runs_page, runs_page[:2000]
    for site in SITES:
        assert re.search(rf"\b{site}-\w+-{summary['job_name']}", runs_page), (site, runs_page[:2000])

    for site, run_id in sorted(summary["mlflow"]["run_ids"].items()):
        page = _browse(chromium, f"{base}/runs/{run_id}", out_dir / f"{site}.png")
        assert site in page, page[:2000]
        missing = [m for m in METRICS if not re.search(rf"\b{m}\b", page)]
        assert not missing, (site, missing, page[:3000])
    for png in ("runs.png", *(f"{s}.png" for s in SITES)):
        assert (out_dir / png).stat().st_size > 10_000, png


def _chart_cards(dom: str) -> dict[str, str]:
    """Metric name -> the DOM of its chart card (from its title to the next card's title)."""
    titles = list(re.finditer(r'<h4 [^>]*title="([^"]+)"', dom))
    ends = [m.start() for m in titles[1:]] + [len(dom)]
    return {m.group(1): dom[m.start() : end] for m, end in zip(titles, ends, strict=True)}


def test_printed_url_opens_charts_with_both_sites_loss_and_dice(experiment_run, run_mlflow):
    chromium = _chromium()
    summary = experiment_run.summary
    experiment_id = summary["mlflow"]["experiment_id"]
    printed = re.search(r"charts of the sites' runs: (\S+)", experiment_run.stdout)
    assert printed, experiment_run.stdout[-3000:]
    # the run's own server is gone; the same store is served again on another port
    url = printed.group(1).replace(summary["mlflow"]["tracking_uri"], run_mlflow.url)
    assert url == f"{run_mlflow.url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART"
    out_dir = experiment_run.run_dir / "dashboard"
    out_dir.mkdir(exist_ok=True)
    dom = _browse(chromium, url, out_dir / "charts.png", raw=True)
    assert "Training runs" in dom and "No data available" not in dom, dom[:3000]
    cards = _chart_cards(dom)
    for metric in CHARTED:
        assert metric in cards, (metric, sorted(cards))
        card = cards[metric]
        lines = re.findall(r'<path class="js-line" d="M[^"]*L[^"]*"', card)  # a drawn line of 2 or more points
        assert len(lines) >= len(SITES), (metric, lines)
        for site in SITES:
            assert re.search(rf">{site}-[^<]*\({metric}\)<", card), (metric, site)  # its legend entry
    assert (out_dir / "charts.png").stat().st_size > 20_000
