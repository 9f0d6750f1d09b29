"""The validity study end to end, reduced: real bundle training, real NVFlare simulator, real MLflow.

One run of ``spleen-bench validity --tiny --settings noniid --rounds 2 --local-epochs 4 --methods fedavg`` (6 small
cases, 8 epochs per arm, seed 0) shared by the tests below; 92 s on 2 cores (a second method, FedBN,
measured 51 s more at 32 epochs: the suite has no room for it; FedBN runs end to end through the one command in
tests/e2e/test_tracking_modes.py, and the study's handling of its per-site copies is unit-tested). The non-IID
setting is the one where federation has to pay off (the IID data layout is unit-tested; the arms are the same code
for both). Its conclusion is not asserted here: a reduced study does not reach it on every CPU (seed 0 at 32
epochs, on an AMD EPYC: FedAvg above every local-only model on the other site's data by 0.17 and 0.11, the same
scores run after run; on an Intel Xeon: FedAvg 0.08 / 0.23 against centralized 0.66 / 0.67, undertrained, below local
site-1 on site-2). The verdicts are checked to follow from the scores, and the study's scores of the global model
against the sites' own final validation of it; the conclusion is judged on the recorded full study (50 epochs,
two seeds) in tests/benchmarks/test_validity_record.py. The mean and range over seeds and the "seeds agree" rule
are unit-tested (tests/unit/test_validity.py); a study of two seeds is twice this one.
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
METHODS = {"fedavg": "FedAvg"}
SEED = "0"
ROUNDS, LOCAL_EPOCHS = 2, 4
SITES = ["site-1", "site-2"]
MODELS = ["centralized", "local site-1", "local site-2", "FedAvg"]
# The study's score of the final global model against the site's own score of it (same cases,
# same bundle settings; the sites train and score with 1 thread each, the study with 2)
SAME_SCORE = 0.01


@dataclass
class StudyRun:
    returncode: int
    stdout: str
    stderr: str
    out: Path

    @property
    def result(self) -> dict:
        return json.loads((self.out / "validity.json").read_text())

    def seed(self, setting: str = "noniid") -> dict:
        return self.result["results"][setting]["seeds"][SEED]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyRun:
    out = tmp_path_factory.mktemp("validity") / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "spleen_tools.cli.bench", "validity", "--tiny", "--settings", ",".join(SETTINGS)]
        + ["--rounds", str(ROUNDS), "--local-epochs", str(LOCAL_EPOCHS), "--methods", ",".join(METHODS)]
        + ["--seeds", SEED, "--out", str(out)],
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
        assert f"## {setting}" in study.stdout and f"### seed {SEED}" in study.stdout
    assert "| model | site-1 val | site-2 val | held-out | mean (sites' val) |" in study.stdout
    assert str(study.out / "validity.json") in study.stdout and str(study.out / "validity.md") in study.stdout
    assert str(study.out / "noniid_dice.png") in study.stdout


def test_every_model_scored_on_every_site_and_held_out(study):
    result = study.result
    assert result["format"] == 2 and result["settings"]["epochs"] == ROUNDS * LOCAL_EPOCHS
    assert result["settings"]["tiny"] is True and result["settings"]["seeds"] == [int(SEED)]
    assert result["settings"]["method_names"] == METHODS
    for setting in SETTINGS:
        run = result["results"][setting]["seeds"][SEED]
        assert set(run["scores"]) == set(MODELS), setting
        for model, row in run["scores"].items():
            assert set(row) == {*SITES, "held_out"}, (setting, model)
            assert all(0.0 <= dice <= 1.0 for dice in row.values()), (setting, model, row)
        assert [r["model"] for r in run["table"]] == MODELS
        assert [r["model"] for r in result["results"][setting]["table"]] == MODELS
        assert not run["errors"] and not result["results"][setting]["errors"]


def test_the_verdict_against_local_models_follows_from_the_scores(study):
    """Each local-only model against FedAvg on the other site's validation data, taken from the score table; the
    worst margin and the verdict follow from them."""
    scores = study.seed()["scores"]
    versus_local = study.seed()["expectations"]["FedAvg"]["vs_local"]
    pairs = [(f"local {mine}", other) for mine in SITES for other in SITES if other != mine]
    assert [(c["local_model"], c["on"]) for c in versus_local["comparisons"]] == pairs
    for c in versus_local["comparisons"]:
        assert (c["local"], c["method"]) == (scores[c["local_model"]][c["on"]], scores["FedAvg"][c["on"]]), c
        assert c["holds"] == (c["method"] > c["local"]), c
    margins = [c["method"] - c["local"] for c in versus_local["comparisons"]]
    assert versus_local["worst_margin"] == pytest.approx(min(margins), abs=1e-4)
    assert versus_local["holds"] == all(c["holds"] for c in versus_local["comparisons"])
    verdict = study.result["results"]["noniid"]["verdicts"]["FedAvg"]
    assert verdict["vs_local"]["verdict"] == ("holds" if versus_local["holds"] else "does not hold")
    assert verdict["seeds"] == [SEED]


def test_each_method_is_judged_from_the_scores(study):
    """Undertrained here, so not asserted to hold (docstring above); the verdicts follow from the two means."""
    setting = study.result["results"]["noniid"]
    run = setting["seeds"][SEED]
    md = (study.out / "validity.md").read_text()
    assert "## noniid" in md
    for name in METHODS.values():
        check = run["expectations"][name]
        versus = check["vs_centralized"]
        method = sum(run["scores"][name][s] for s in SITES) / len(SITES)
        centralized = sum(run["scores"]["centralized"][s] for s in SITES) / len(SITES)
        assert versus["method"] == round(method, 4) and versus["centralized"] == round(centralized, 4)
        assert versus["holds"] == (method >= centralized - CENTRALIZED_TOLERANCE)
        assert check["holds"] == (versus["holds"] and check["vs_local"]["holds"])
        # one seed: the conclusion is that seed's
        assert setting["verdicts"][name]["verdict"] == ("holds" if check["holds"] else "does not hold")
        verdict = f"- {name}: expectations hold." if check["holds"] else f"- {name}: expectations do NOT hold."
        assert md.count(verdict) == 1, name
        summary = setting["summary"][name]["mean"]
        assert summary["values"] == [round(method, 4)] and summary["min"] == summary["max"] == summary["mean"]


def test_the_study_scores_the_global_model_as_the_sites_score_it(study):
    """The study's score of the last global model on each site's validation cases is the site's own final
    validation of it (same cases, same bundle settings)."""
    run = study.seed()
    fl = run["fl"]
    assert set(fl) == set(METHODS) and all(info["returncode"] == 0 for info in fl.values())
    for site in SITES:
        for method, name in METHODS.items():
            own = fl[method]["sites_final_dice"][site]
            assert run["scores"][name][site] == pytest.approx(own, abs=SAME_SCORE), (name, site)


def test_curves_per_arm_and_pngs(study):
    for setting in SETTINGS:
        res = study.result["results"][setting]
        run = res["seeds"][SEED]
        curves = run["curves"]
        assert [p["epoch"] for p in curves["centralized"]["centralized"]] == list(range(1, ROUNDS * LOCAL_EPOCHS + 1))
        assert set(curves["local"]) == {"local site-1", "local site-2"}
        # the global model's Dice at round 0 (initial model), each round, and after the last (final validation)
        for method, name in METHODS.items():
            assert [p["round"] for p in curves[method][name]] == list(range(ROUNDS + 1)), method
            assert run["seconds"][name] > 0
        for arm in ("centralized", "local", *METHODS):
            png = Path(run["plots"][arm])
            assert png.parent == study.out and png.read_bytes()[:4] == b"\x89PNG", arm
        chart = Path(res["plots"]["dice"])
        assert chart == study.out / f"{setting}_dice.png" and chart.read_bytes()[:4] == b"\x89PNG"


def test_noniid_sites_differ(study):
    sites = study.seed()["data"]["sites"]
    first, second = (sites[s]["style"] for s in SITES)
    assert first["intensity_offset"] != second["intensity_offset"]
    assert first["spacing"] != second["spacing"] and first["shape"] != second["shape"]


def test_final_models_kept_once(study):
    for setting in SETTINGS:
        work = study.out / "work" / setting / f"seed-{SEED}"
        assert sorted(p.name for p in (work / "models").glob("*.pt")) == [
            "FedAvg.pt",
            "centralized.pt",
            "local_site-1.pt",
            "local_site-2.pt",
        ]
        assert not list(work.glob("*/**/bundle/*/models/*.pt")), "the bundle's own checkpoints are dropped"
