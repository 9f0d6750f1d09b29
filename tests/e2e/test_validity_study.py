"""The validity study end to end, reduced: real bundle training, real NVFlare simulator, real MLflow.

One run of ``spleen-bench validity --tiny --settings noniid --rounds 4 --local-epochs 8`` (6 small cases, 32 epochs
per arm, seed 0) shared by the tests below; about two and a half minutes on 2 cores. The non-IID setting is the one
where federation has to pay off (the IID data layout is unit-tested; the arms are the same code for both). Its
conclusion is asserted as far as a reduced study reaches it: FedAvg above every local-only model on the other
site's data (seed 0: by 0.17 and 0.11 Dice, the same scores run after run; it held at seed 1 too, by 0.05 and 0.08,
and at 60 epochs at seeds 0-2). FedAvg within 0.02 of centralized needs converged models (the full study:
50 epochs on 8 cases per site, about 23 minutes; its recorded result is judged again in
tests/benchmarks/test_validity_record.py): here the verdict is only checked to follow from the scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from spleen_tools.bench.study_settings import CENTRALIZED_TOLERANCE

REPO_ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ["noniid"]
ROUNDS, LOCAL_EPOCHS = 4, 8
SITES = ["site-1", "site-2"]
MODELS = {"centralized", "local site-1", "local site-2", "FedAvg"}
# FedAvg above each local model on the other site by this much (seed 0: 0.17 and 0.11), and above this itself
MARGIN = 0.05
MIN_FEDAVG_DICE = 0.15


@dataclass
class StudyRun:
    returncode: int
    stdout: str
    stderr: str
    out: Path

    @property
    def result(self) -> dict:
        return json.loads((self.out / "validity.json").read_text())


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyRun:
    out = tmp_path_factory.mktemp("validity") / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "spleen_tools.cli.bench", "validity", "--tiny", "--settings", ",".join(SETTINGS)]
        + ["--rounds", str(ROUNDS), "--local-epochs", str(LOCAL_EPOCHS), "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    return StudyRun(proc.returncode, proc.stdout, proc.stderr, out)


def test_study_exits_cleanly_and_prints_tables_and_paths(study):
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    for setting in SETTINGS:
        assert f"## {setting}" in study.stdout
    assert "| model | site-1 val | site-2 val | held-out | mean (sites' val) |" in study.stdout
    assert str(study.out / "validity.json") in study.stdout and str(study.out / "validity.md") in study.stdout


def test_every_model_scored_on_every_site_and_held_out(study):
    result = study.result
    assert result["settings"]["epochs"] == ROUNDS * LOCAL_EPOCHS and result["settings"]["tiny"] is True
    for setting in SETTINGS:
        scores = result["results"][setting]["scores"]
        assert set(scores) == MODELS, setting
        for model, row in scores.items():
            assert set(row) == {*SITES, "held_out"}, (setting, model)
            assert all(0.0 <= dice <= 1.0 for dice in row.values()), (setting, model, row)
        assert [r["model"] for r in result["results"][setting]["table"]] == [
            "centralized",
            "local site-1",
            "local site-2",
            "FedAvg",
        ]
        assert not result["results"][setting]["errors"]


def test_fedavg_beats_every_local_model_on_the_other_sites_data(study):
    """The study's conclusion as far as 32 epochs on tiny data reach it: each site's own model fails on the other
    site's scans (another intensity calibration, spacing and field of view), the federated one does not."""
    expectations = study.result["results"]["noniid"]["expectations"]
    versus_local = expectations["fedavg_vs_local"]
    assert len(versus_local["comparisons"]) == len(SITES) * (len(SITES) - 1)
    for c in versus_local["comparisons"]:
        assert c["holds"] and c["fedavg"] > c["local"] + MARGIN, c
    assert versus_local["holds"] is True
    scores = study.result["results"]["noniid"]["scores"]
    assert min(scores["FedAvg"][site] for site in SITES) > MIN_FEDAVG_DICE, scores["FedAvg"]


def test_fedavg_against_centralized_is_judged_from_the_scores(study):
    """Undertrained here, so not asserted to hold (docstring above); the verdict follows from the two means."""
    result = study.result["results"]["noniid"]
    versus = result["expectations"]["fedavg_vs_centralized"]
    fedavg = sum(result["scores"]["FedAvg"][s] for s in SITES) / len(SITES)
    centralized = sum(result["scores"]["centralized"][s] for s in SITES) / len(SITES)
    assert versus["fedavg"] == round(fedavg, 4) and versus["centralized"] == round(centralized, 4)
    assert versus["holds"] == (fedavg >= centralized - CENTRALIZED_TOLERANCE)
    assert result["expectations"]["holds"] == (versus["holds"] and result["expectations"]["fedavg_vs_local"]["holds"])
    md = (study.out / "validity.md").read_text()
    verdict = "Expectations hold." if result["expectations"]["holds"] else "Expectations do NOT hold."
    assert "## noniid" in md and md.count(verdict) == 1


def test_curves_per_arm_and_pngs(study):
    for setting in SETTINGS:
        res = study.result["results"][setting]
        curves = res["curves"]
        assert [p["epoch"] for p in curves["centralized"]["centralized"]] == list(range(1, ROUNDS * LOCAL_EPOCHS + 1))
        assert set(curves["local"]) == {"local site-1", "local site-2"}
        # the global model's Dice at round 0 (initial model), each round, and after the last (final validation)
        assert [p["round"] for p in curves["fedavg"]["FedAvg"]] == list(range(ROUNDS + 1))
        for arm in ("centralized", "local", "fedavg"):
            png = Path(res["plots"][arm])
            assert png.parent == study.out and png.read_bytes()[:4] == b"\x89PNG"
        assert res["seconds"]["FedAvg"] > 0 and res["fedavg"]["returncode"] == 0


def test_noniid_sites_differ(study):
    sites = study.result["results"]["noniid"]["data"]["sites"]
    first, second = (sites[s]["style"] for s in SITES)
    assert first["intensity_offset"] != second["intensity_offset"]
    assert first["spacing"] != second["spacing"] and first["shape"] != second["shape"]


def test_final_models_kept_once(study):
    for setting in SETTINGS:
        work = study.out / "work" / setting
        assert sorted(p.name for p in (work / "models").glob("*.pt")) == [
            "FedAvg.pt",
            "centralized.pt",
            "local_site-1.pt",
            "local_site-2.pt",
        ]
        assert not list(work.glob("*/**/bundle/*/models/*.pt")), "the bundle's own checkpoints are dropped"
