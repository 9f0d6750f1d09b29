"""The full validity study's conclusion, as recorded (benchmarks/results/validity.json, 50 epochs: a benchmark
command, not a test) and as the README states it: every recorded check judged again from the recorded scores by
today's rules, FedAvg holding in the IID and non-IID settings in every recorded seed, and the README's figures the
recorded ones. The record may be of either format (format 1: one seed, FedAvg; format 2: seeds and methods;
spleen_tools.bench.study_record reads both). Also: save_validity.py's record of a study and BENCHMARKS.md's
section from it. The reduced study in tests/e2e/test_validity_study.py runs the study end to end; this keeps the
published claim tied to its data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spleen_tools.bench.study_checks import HOLDS, check_expectations, method_verdicts
from spleen_tools.bench.study_record import recorded_seeds, recorded_settings, recorded_sites, recorded_verdicts
from spleen_tools.bench.study_tables import score_table, table_scores

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import save_validity  # noqa: E402
import write_benchmarks_md  # noqa: E402

RECORD = json.loads((REPO / "benchmarks" / "results" / "validity.json").read_text())
RESULT = RECORD["result"]
README_SETTINGS = {"iid": "IID", "noniid": "non-IID"}  # where the README states FedAvg's figures
SITES = ["site-1", "site-2"]


@pytest.mark.parametrize("setting", recorded_settings(RESULT))
def test_the_recorded_checks_follow_from_the_recorded_scores(setting):
    sites, tolerance = recorded_sites(RESULT), RESULT["settings"]["centralized_tolerance"]
    seeds = recorded_seeds(RESULT, setting)
    for seed, run in seeds.items():
        scores = table_scores(run["table"])
        for method, recorded in run["expectations"].items():
            assert check_expectations(scores, sites, method, tolerance) == recorded, (seed, method)
    methods = list(next(iter(seeds.values()))["expectations"])
    judged = method_verdicts({seed: run["expectations"] for seed, run in seeds.items()}, methods)
    assert judged == recorded_verdicts(RESULT, setting)
    assert RESULT["settings"]["epochs"] == 50 and not RESULT["settings"]["tiny"]


@pytest.mark.parametrize("setting", list(README_SETTINGS))
def test_fedavg_holds_in_every_recorded_seed_where_the_readme_says_so(setting):
    verdict = recorded_verdicts(RESULT, setting)["FedAvg"]
    assert verdict["verdict"] == HOLDS, verdict


def _seed_mean(setting: str, seed: str, model: str) -> float:
    """A model's mean over the sites' validation at one recorded seed."""
    return next(row["mean"] for row in recorded_seeds(RESULT, setting)[seed]["table"] if row["model"] == model)


def test_the_readme_states_the_recorded_figures():
    readme = " ".join((REPO / "README.md").read_text().split())
    for setting, name in README_SETTINGS.items():
        for seed in ("0", "1"):
            fedavg, centralized = _seed_mean(setting, seed, "FedAvg"), _seed_mean(setting, seed, "centralized")
            claim = f"seed {seed} {fedavg:.3f} vs {centralized:.3f}"
            assert claim in readme, (name, claim)
        verdicts = recorded_verdicts(RESULT, setting)
        assert [m for m, v in verdicts.items() if v["verdict"] == HOLDS] == ["FedAvg", "FedProx", "FedBN"], setting
    summary = {s: RESULT[s]["summary"]["FedOpt"]["mean"]["mean"] for s in README_SETTINGS}
    claim = f"FedOpt (untuned) does not ({summary['iid']:.3f} IID, {summary['noniid']:.3f} non-IID over the seeds)"
    assert claim in readme, claim
    assert "IID: seed 0" in readme and "non-IID: seed 0" in readme


def test_the_benchmarks_page_renders_the_record():
    text = "\n".join(write_benchmarks_md.validity(RECORD))
    assert text.startswith("## Does federation pay off (validity study)") and RECORD["command"] in text
    for setting in recorded_settings(RESULT):
        assert f"\n### {setting}\n" in text
        for seed, run in recorded_seeds(RESULT, setting).items():
            fedavg = next(row for row in run["table"] if row["model"] == "FedAvg")
            assert f"| FedAvg | {fedavg['site-1']:.4f} |" in text, seed


def _seed_run(fedavg: tuple[float, float], fedprox: tuple[float, float]) -> dict:
    """One phase seed as ``validity.run_seed`` returns it (no training): centralized 0.9, locals 0.95 / 0.3."""
    rows = {"centralized": (0.9, 0.9), "local site-1": (0.95, 0.3), "local site-2": (0.3, 0.95)}
    rows |= {"FedAvg": fedavg, "FedProx": fedprox}
    scores = {model: {"site-1": a, "site-2": b, "held_out": 0.5} for model, (a, b) in rows.items()}
    styles = {"site-1": "non_contrast", "site-2": "portal_venous"}
    data = {"sites": {site: {"training": 2, "validation": 1, "style": {"phase": p}} for site, p in styles.items()}}
    checks = {m: check_expectations(scores, SITES, m) for m in ("FedAvg", "FedProx")}
    return {"data": data, "sites": SITES, "scores": scores, "table": score_table(scores, SITES, list(checks))} | {
        "expectations": checks,
        "seconds": {"centralized": 1.0},
        "epoch_seconds": {},
        "curves": {},
        "plots": {},
        "errors": {},
    }


def _study(tmp_path: Path) -> Path:
    """A format-2 study folder as ``spleen-bench validity`` leaves it (two seeds, two methods; no training)."""
    from spleen_tools.bench.study_settings import ValiditySettings
    from spleen_tools.bench.validity import combine_seeds, write_outputs

    settings = ValiditySettings(settings=("phase",), seeds=(0, 1), methods=("fedavg", "fedprox"))
    runs = {"0": _seed_run((0.85, 0.85), (0.9, 0.89)), "1": _seed_run((0.9, 0.89), (0.91, 0.9))}
    described = {"rounds": 10, "local_epochs": 5, "epochs": 50, "sites": 2, "settings": ["phase"], "tiny": False}
    described |= {"seeds": [0, 1], "methods": ["fedavg", "fedprox"], "centralized_tolerance": 0.02}
    described |= {"method_names": {"fedavg": "FedAvg", "fedprox": "FedProx"}}
    study = {"study": "validity", "format": 2, "settings": described, "seconds": 1.0, "results": {}}
    study["results"]["phase"] = combine_seeds("phase", runs, settings, tmp_path)
    write_outputs(study, tmp_path)
    return tmp_path


def test_a_study_of_seeds_and_methods_recorded_and_rendered(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(save_validity.record, "save", lambda name, result, command: saved.update(locals()))
    monkeypatch.setattr(save_validity, "IMAGES", tmp_path / "images")
    (tmp_path / "images").mkdir()
    assert save_validity.main([str(_study(tmp_path)), "--name", "validity_phase"]) == 0
    assert (tmp_path / "images" / "validity_phase_dice.png").read_bytes() == (tmp_path / "phase_dice.png").read_bytes()
    result = saved["result"]
    assert saved["command"] == (
        ".venv/bin/spleen-bench validity --rounds 10 --local-epochs 5 --sites 2 --settings phase --seeds 0,1 "
        "--methods fedavg,fedprox"
    )
    assert set(result["phase"]["seeds"]) == {"0", "1"} and "curves" not in result["phase"]["seeds"]["0"]
    assert result["phase"]["phase_goal"]["meeting"] == ["FedProx"]
    assert recorded_verdicts(result, "phase")["FedAvg"]["verdict"] == "seeds disagree"
    assert recorded_seeds(result, "phase")["1"]["expectations"]["FedAvg"]["holds"] is True
    record = {"command": saved["command"], "date": "today", "machine": {"cores": 2, "cpu": "x", "memory_gb": 1}}
    text = "\n".join(write_benchmarks_md.validity(record | {"versions": {}, "result": result}))
    assert "\n### phase\n" in text and "\n#### seed 1\n" in text and "**Does FedAvg fall behind" in text


def test_a_format_1_study_command_and_headings():
    settings = {"rounds": 10, "local_epochs": 5, "sites": 2, "settings": ["iid", "noniid"], "seed": 0}
    assert save_validity.study_command(settings) == (
        ".venv/bin/spleen-bench validity --rounds 10 --local-epochs 5 --sites 2 --settings iid,noniid --seed 0"
    )
    assert save_validity.demote_headings("## iid\n\ntext\n### seed 0\n") == "### iid\n\ntext\n#### seed 0\n"


PHASE = json.loads((REPO / "benchmarks" / "results" / "validity_phase.json").read_text())["result"]


def test_the_recorded_phase_study_judged_again():
    """The methods study in the contrast-phase setting (its own record): every check follows from its scores, at
    the full length, over two seeds."""
    sites, tolerance = recorded_sites(PHASE), PHASE["settings"]["centralized_tolerance"]
    seeds = recorded_seeds(PHASE, "phase")
    assert sorted(seeds) == ["0", "1"] and PHASE["settings"]["epochs"] == 50 and not PHASE["settings"]["tiny"]
    for seed, run in seeds.items():
        scores = table_scores(run["table"])
        assert set(run["expectations"]) == {"FedAvg", "FedProx", "FedOpt", "FedBN"}
        for method, recorded in run["expectations"].items():
            assert check_expectations(scores, sites, method, tolerance) == recorded, (seed, method)
    methods = list(next(iter(seeds.values()))["expectations"])
    judged = method_verdicts({seed: run["expectations"] for seed, run in seeds.items()}, methods)
    assert judged == recorded_verdicts(PHASE, "phase")


def test_the_readme_states_the_recorded_phase_figures():
    summary, seeds = PHASE["phase"]["summary"], recorded_seeds(PHASE, "phase")

    def mean(model: str, column: str) -> str:
        return f"{summary[model][column]['mean']:.3f}"

    def seed_mean(seed: str, model: str) -> float:
        return next(row["mean"] for row in seeds[seed]["table"] if row["model"] == model)

    readme = " ".join((REPO / "README.md").read_text().split())
    assert summary["local site-2"]["site-1"]["values"] == [0.0, 0.0]
    fedavg, centralized = seed_mean("0", "FedAvg"), seed_mean("0", "centralized")
    claims = [
        "finds no spleen on the non-contrast scans (Dice 0.000 at both seeds)",
        f"FedAvg reaches {mean('FedAvg', 'site-1')} there and {mean('FedAvg', 'site-2')} on the portal-venous site",
        f"falls behind ({mean('FedOpt', 'mean')} over the sites)",
        f"best on the non-contrast site ({mean('FedBN', 'site-1')}) but less on the portal-venous one "
        f"({mean('FedBN', 'site-2')}) and on held-out cases of both phases ({mean('FedBN', 'held_out')})",
        f"at seed 0 FedAvg is {centralized - fedavg:.3f} below centralized ({fedavg:.3f} vs {centralized:.3f})",
        f"epoch 40, {seed_mean('1', 'centralized'):.3f} at epoch 50",
    ]
    for claim in claims:
        assert claim in readme, claim
    gaps = [abs(summary["FedAvg"][c]["mean"] - summary["FedProx"][c]["mean"]) for c in ("site-1", "site-2", "mean")]
    assert max(gaps) <= 0.003 and "FedProx is within 0.003 of it" in readme


SCAFFOLD_PHASE = json.loads((REPO / "benchmarks" / "results" / "validity_phase_scaffold.json").read_text())["result"]


def test_the_scaffold_phase_study_reproduces_the_arms_and_the_readme_states_it():
    """SCAFFOLD's phase study, a record of its own: its centralized and local arms are the phase study's (the arms
    are deterministic for a seed), its checks follow from its scores, and the README's figures are its."""
    seeds, phase_seeds = recorded_seeds(SCAFFOLD_PHASE, "phase"), recorded_seeds(PHASE, "phase")
    assert sorted(seeds) == ["0", "1"] and SCAFFOLD_PHASE["settings"]["epochs"] == 50
    for seed, run in seeds.items():
        rows = {row["model"]: row for row in run["table"]}
        for arm in ("centralized", "local site-1", "local site-2"):
            assert rows[arm] == next(r for r in phase_seeds[seed]["table"] if r["model"] == arm), (seed, arm)
        scores = table_scores(run["table"])
        assert check_expectations(scores, recorded_sites(SCAFFOLD_PHASE), "SCAFFOLD") == run["expectations"]["SCAFFOLD"]
    assert recorded_verdicts(SCAFFOLD_PHASE, "phase")["SCAFFOLD"]["verdict"] == HOLDS
    summary = SCAFFOLD_PHASE["phase"]["summary"]["SCAFFOLD"]
    seed0 = {row["model"]: row["mean"] for row in seeds["0"]["table"]}
    readme = " ".join((REPO / "README.md").read_text().split())
    claims = [
        f"seed 0: {seed0['SCAFFOLD']:.3f} vs centralized {seed0['centralized']:.3f}, "
        f"{seed0['centralized'] - seed0['SCAFFOLD']:.3f} below",
        f"{summary['site-1']['mean']:.3f} on the non-contrast site and {summary['site-2']['mean']:.3f} on the",
    ]
    for claim in claims:
        assert claim in readme, claim


SCAFFOLD_SETTINGS = json.loads((REPO / "benchmarks" / "results" / "validity_scaffold.json").read_text())["result"]


@pytest.mark.parametrize("setting", list(README_SETTINGS))
def test_the_scaffold_study_over_iid_and_noniid_reproduces_the_arms_and_the_readme_states_it(setting):
    seeds, main_seeds = recorded_seeds(SCAFFOLD_SETTINGS, setting), recorded_seeds(RESULT, setting)
    readme = " ".join((REPO / "README.md").read_text().split())
    for seed, run in seeds.items():
        rows = {row["model"]: row for row in run["table"]}
        for arm in ("centralized", "local site-1", "local site-2"):
            assert rows[arm] == next(r for r in main_seeds[seed]["table"] if r["model"] == arm), (seed, arm)
        scores = table_scores(run["table"])
        assert check_expectations(scores, SITES, "SCAFFOLD") == run["expectations"]["SCAFFOLD"]
        claim = f"seed {seed} {rows['SCAFFOLD']['mean']:.3f} vs {rows['centralized']['mean']:.3f}"
        assert claim in readme, (setting, claim)
    assert recorded_verdicts(SCAFFOLD_SETTINGS, setting)["SCAFFOLD"]["verdict"] == HOLDS
