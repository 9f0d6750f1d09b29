"""The validity study end to end on --tiny settings: real bundle training, real NVFlare simulator, real MLflow.

One run of ``python -m spleen_tools.cli.bench validity --tiny`` (both data settings, 1 round x 1 epoch, 6 small
cases per setting) shared by the tests below; it takes about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ["iid", "noniid"]
SITES = ["site-1", "site-2"]
MODELS = {"centralized", "local site-1", "local site-2", "FedAvg"}


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
        [sys.executable, "-m", "spleen_tools.cli.bench", "validity", "--tiny", "--out", str(out)],
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
    assert result["settings"]["epochs"] == 1 and result["settings"]["tiny"] is True
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


def test_expectations_checked_and_written(study):
    md = (study.out / "validity.md").read_text()
    for setting in SETTINGS:
        expectations = study.result["results"][setting]["expectations"]
        assert isinstance(expectations["holds"], bool)
        assert len(expectations["fedavg_vs_local"]["comparisons"]) == 2
        assert f"## {setting}" in md
    assert md.count("Expectations hold.") + md.count("Expectations do NOT hold.") == len(SETTINGS)


def test_curves_per_arm_and_pngs(study):
    for setting in SETTINGS:
        res = study.result["results"][setting]
        curves = res["curves"]
        assert [p["epoch"] for p in curves["centralized"]["centralized"]] == [1]
        assert set(curves["local"]) == {"local site-1", "local site-2"}
        # the global model's Dice at round 0 (initial model) and after the one round (final validation)
        assert [p["round"] for p in curves["fedavg"]["FedAvg"]] == [0, 1]
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
