"""The validity study's fast pieces: tables, the checks per seed and across seeds, the phase question's answer,
the report and its files, the record's older format, what the FL arm reads from the sites' logs, the curves and
charts. Nothing here trains or starts the simulator (the data: test_study_data.py; the CLI: test_cli_bench.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from spleen_tools.bench.study_checks import (
    DISAGREE,
    FAILS,
    HOLDS,
    UNJUDGED,
    agreed,
    check_expectations,
    method_verdict,
    method_verdicts,
    phase_goal,
)
from spleen_tools.bench.study_record import expectations_from_format_1, recorded_seeds, recorded_verdicts
from spleen_tools.bench.study_report import (
    markdown_report,
    markdown_section,
    markdown_table,
    phase_goal_line,
    range_cell,
    verdict_table,
)
from spleen_tools.bench.study_settings import ValiditySettings
from spleen_tools.bench.study_tables import (
    copy_name,
    mean_table,
    score_table,
    site_copies_row,
    summarize,
    table_scores,
)

SITES = ["site-1", "site-2"]
COLUMNS = [*SITES, "held_out", "mean"]
TOL = 0.02
# Sites' progress lines as the simulator's logs hold them (with and without a log prefix).
PROGRESS_LINES = [
    '2026 - INFO - [spleen] {"kind": "round", "site": "site-1", "round": 0, "global_dice": 0.01}',
    '[spleen] {"kind": "round", "site": "site-2", "round": 0, "global_dice": 0.03}',
    '[spleen] {"kind": "round", "site": "site-1", "round": 1, "global_dice": 0.5}',
    '[spleen] {"kind": "round", "site": "site-2", "round": 1, "global_dice": 0.7}',
    '[spleen] {"kind": "final", "site": "site-1", "round": 2, "global_dice": 0.8}',
    '[spleen] {"kind": "final", "site": "site-2", "round": 2, "global_dice": 0.9}',
    '[spleen] {"kind": "cross_site", "site": "site-2", "val_mean_dice": 0.1}',
]


def scores(fed, cen, l1, l2, **methods):
    """Scores of the models on (site-1, site-2); held-out is 0.5 for everyone. ``methods``: more FL models."""
    rows = {"FedAvg": fed, "centralized": cen, "local site-1": l1, "local site-2": l2, **methods}
    return {model: {"site-1": a, "site-2": b, "held_out": 0.5} for model, (a, b) in rows.items()}


# One seed's scores where FedAvg meets both expectations, and one where it is 0.05 behind centralized.
GOOD = scores((0.9, 0.85), (0.91, 0.86), (0.95, 0.4), (0.3, 0.9), FedProx=(0.92, 0.86))
BEHIND = scores((0.85, 0.85), (0.9, 0.9), (0.95, 0.4), (0.3, 0.9), FedProx=(0.9, 0.89))


def a_run(seed: int, values: dict, methods=("FedAvg", "FedProx"), phase: bool = False) -> dict:
    """One seed's result as ``validity.run_seed`` returns it (no curves, no training)."""
    style = {"site-1": "non_contrast", "site-2": "portal_venous"} if phase else {}
    data = {"sites": {s: {"training": 2, "validation": 1, "style": {"phase": style.get(s)}} for s in SITES}}
    return {
        "seed": seed,
        "data": data,
        "sites": SITES,
        "scores": values,
        "table": score_table(values, SITES, list(methods)),
        "expectations": {m: check_expectations(values, SITES, m) for m in methods},
        "seconds": {"centralized": 12.3},
        "plots": {},
        "errors": {},
    }


def test_table_rows_are_ordered_and_mean_is_over_sites_validation():
    table = score_table(scores((0.9, 0.8), (0.92, 0.84), (0.95, 0.4), (0.3, 0.9)), SITES)
    assert [row["model"] for row in table] == ["centralized", "local site-1", "local site-2", "FedAvg"]
    fed = table[-1]
    assert fed["site-1"] == 0.9 and fed["held_out"] == 0.5 and fed["mean"] == pytest.approx(0.85)


def test_methods_follow_the_local_models_in_the_given_order():
    values = scores((0.9, 0.8), (0.9, 0.8), (0.9, 0.8), (0.9, 0.8), FedBN=(0.7, 0.7), FedProx=(0.8, 0.8))
    table = score_table(values, SITES, ["FedProx", "FedAvg", "FedBN"])
    assert [r["model"] for r in table][3:] == ["FedProx", "FedAvg", "FedBN"]
    assert table_scores(table)["FedBN"] == {"site-1": 0.7, "site-2": 0.7, "held_out": 0.5}


def test_table_with_a_missing_model_score_has_no_mean():
    table = score_table({"FedAvg": {"site-1": 0.9}}, SITES)
    assert math.isnan(table[0]["site-2"]) and math.isnan(table[0]["mean"])


def test_local_models_sort_by_site_number():
    names = {f"local site-{i}": {} for i in (10, 2, 1)}
    assert [r["model"] for r in score_table(names, SITES)] == ["local site-1", "local site-2", "local site-10"]


def test_expectations_hold():
    result = check_expectations(scores((0.9, 0.85), (0.91, 0.86), (0.95, 0.4), (0.3, 0.9)), SITES)
    assert result["holds"] and result["method"] == "FedAvg"
    assert result["vs_centralized"]["gap"] == pytest.approx(-0.01)
    comparisons = result["vs_local"]["comparisons"]
    assert [(c["local_model"], c["on"]) for c in comparisons] == [
        ("local site-1", "site-2"),
        ("local site-2", "site-1"),
    ]
    assert result["vs_local"]["worst_margin"] == pytest.approx(0.45)  # site-2: 0.85 vs 0.4; site-1: 0.9 vs 0.3


def test_method_more_than_tolerance_below_centralized_fails():
    result = check_expectations(scores((0.85, 0.85), (0.9, 0.86), (0.95, 0.4), (0.3, 0.9)), SITES)
    assert not result["vs_centralized"]["holds"] and result["vs_local"]["holds"]
    assert not result["holds"]


def test_a_local_model_better_on_another_site_fails():
    # local site-1 beats FedAvg on site-2's data; its score on its own site does not count.
    result = check_expectations(scores((0.9, 0.85), (0.9, 0.86), (0.99, 0.87), (0.3, 0.99)), SITES)
    assert result["vs_centralized"]["holds"] and not result["vs_local"]["holds"]
    failed = [c for c in result["vs_local"]["comparisons"] if not c["holds"]]
    assert [(c["local_model"], c["on"]) for c in failed] == [("local site-1", "site-2")]
    assert result["vs_local"]["worst_margin"] == pytest.approx(-0.02)


def test_any_method_is_checked_by_name():
    result = check_expectations(GOOD, SITES, "FedProx")
    assert result["method"] == "FedProx" and result["holds"]
    assert result["vs_centralized"]["rule"] == "FedProx mean over the sites' validation >= centralized - 0.02"
    assert result["vs_local"]["comparisons"][0]["method"] == 0.86


def test_missing_method_never_holds():
    result = check_expectations({"centralized": {"site-1": 0.9, "site-2": 0.9}}, SITES, "FedOpt")
    assert not result["holds"] and result["vs_centralized"]["method"] is None
    assert result["vs_local"]["worst_margin"] is None and not result["vs_local"]["holds"]


def test_summary_over_seeds_is_mean_and_range_per_cell():
    tables = {"0": score_table(GOOD, SITES, ["FedAvg", "FedProx"]), "1": score_table(BEHIND, SITES)}
    summary = summarize(tables, COLUMNS)
    fed = summary["FedAvg"]["site-1"]
    assert fed == {"mean": 0.875, "min": 0.85, "max": 0.9, "values": [0.9, 0.85]}
    assert summary["centralized"]["mean"]["values"] == [0.885, 0.9]
    assert summary["FedProx"]["held_out"] == {"mean": 0.5, "min": 0.5, "max": 0.5, "values": [0.5, 0.5]}
    table = mean_table(summary, SITES, ["FedAvg", "FedProx"])
    assert [r["model"] for r in table] == ["centralized", "local site-1", "local site-2", "FedAvg", "FedProx"]
    assert table[3]["site-1"] == 0.875


def test_a_seed_without_a_score_is_left_out_of_mean_and_range():
    second = {m: row for m, row in BEHIND.items() if m != "FedProx"}  # FedProx failed at seed 1
    second["FedAvg"] = {"site-1": 0.8, "site-2": 0.8}  # FedBN-like: no held-out score
    summary = summarize({"0": score_table(GOOD, SITES), "1": score_table(second, SITES)}, COLUMNS)
    assert summary["FedProx"]["site-1"] == {"mean": 0.92, "min": 0.92, "max": 0.92, "values": [0.92, None]}
    assert summary["FedAvg"]["held_out"]["values"] == [0.5, None]
    assert range_cell(summary["FedProx"]["site-1"]) == "0.9200 (0.9200-0.9200) [1 of 2 seeds]"
    assert range_cell({"mean": None, "min": None, "max": None, "values": [None, None]}) == "-"
    assert range_cell({"mean": 0.5, "min": 0.5, "max": 0.5, "values": [0.5]}) == "0.5000"


def test_a_conclusion_only_where_every_seed_agrees():
    assert agreed([True, True]) == HOLDS == "holds"
    assert agreed([False, False]) == FAILS == "does not hold"
    assert agreed([True, False]) == DISAGREE == "seeds disagree"
    assert agreed([]) == UNJUDGED


def test_method_verdict_over_two_seeds():
    per_seed = {"0": check_expectations(GOOD, SITES), "1": check_expectations(BEHIND, SITES)}
    verdict = method_verdict(per_seed)
    assert verdict["method"] == "FedAvg" and verdict["seeds"] == ["0", "1"]
    assert verdict["vs_centralized"] == {"verdict": DISAGREE, "gaps": {"0": -0.01, "1": -0.05}}
    assert verdict["vs_local"]["verdict"] == HOLDS and verdict["vs_local"]["failed"] == {}
    assert verdict["verdict"] == DISAGREE
    both_behind = method_verdict({"0": check_expectations(BEHIND, SITES), "1": check_expectations(BEHIND, SITES)})
    assert both_behind["verdict"] == FAILS and both_behind["vs_centralized"]["verdict"] == FAILS
    both_good = method_verdict({s: check_expectations(GOOD, SITES, "FedProx") for s in ("0", "1")})
    assert both_good["verdict"] == HOLDS and both_good["method"] == "FedProx"
    failed_run = method_verdict({"0": check_expectations(GOOD, SITES), "1": check_expectations({}, SITES)})
    assert failed_run["verdict"] == failed_run["vs_local"]["verdict"] == UNJUDGED  # no score is no evidence


def test_method_verdict_names_what_failed_per_seed():
    beaten = scores((0.9, 0.85), (0.9, 0.86), (0.99, 0.87), (0.3, 0.99))
    verdict = method_verdict({"0": check_expectations(GOOD, SITES), "1": check_expectations(beaten, SITES)})
    assert verdict["vs_local"]["verdict"] == DISAGREE
    assert verdict["vs_local"]["failed"] == {"1": ["local site-1 on site-2"]}
    assert verdict["vs_local"]["worst_margins"] == {"0": 0.45, "1": -0.02}


def _verdicts(*seeds: dict, methods=("FedAvg", "FedProx")) -> dict:
    checks = {str(i): {m: check_expectations(values, SITES, m) for m in methods} for i, values in enumerate(seeds)}
    return method_verdicts(checks, list(methods))


def test_phase_goal_fedavg_behind_and_a_method_that_closes_the_gap():
    verdicts = _verdicts(BEHIND, BEHIND)
    goal = phase_goal(verdicts)
    assert goal["fedavg_gaps"] == {"0": -0.05, "1": -0.05} and goal["fedavg_within_tolerance"] == FAILS
    assert goal["meeting"] == ["FedProx"]
    line = phase_goal_line(goal, verdicts)
    gaps = "0.0500 below centralized's at seed 0, 0.0500 below centralized's at seed 1"
    assert f"FedAvg's mean Dice over the sites' validation is {gaps}" in line
    assert "behind by more than 0.02 in both seeds" in line
    question = "Within 0.02 of centralized and above every local-only model on the other sites' data in both seeds"
    assert line.endswith(f"{question}: FedProx.")


def test_phase_goal_none_does_with_the_numbers():
    verdicts = _verdicts(GOOD, BEHIND)  # FedAvg: seeds disagree; FedProx: within at seed 0, -0.005 at seed 1
    verdicts["FedProx"] = method_verdict(
        {"0": check_expectations(BEHIND, SITES), "1": check_expectations(BEHIND, SITES)}
    ) | {"method": "FedProx"}
    goal = phase_goal(verdicts)
    assert goal["meeting"] == [] and goal["fedavg_within_tolerance"] == DISAGREE
    line = phase_goal_line(goal, verdicts)
    assert "0.0500 below centralized's at seed 1: the seeds disagree whether it is within 0.02" in line
    assert "in both seeds: none does (FedAvg: gap -0.0100 / -0.0500, worst margin +0.4500 / +0.4500 (seeds " in line
    assert "FedProx: gap -0.0500 / -0.0500" in line and "(does not hold))." in line


def test_phase_goal_without_fedavg_and_with_one_seed():
    verdicts = _verdicts(GOOD, methods=("FedProx",))
    goal = phase_goal(verdicts)
    assert goal["fedavg_gaps"] is None and goal["meeting"] == ["FedProx"]
    line = phase_goal_line(goal, verdicts)
    assert "FedAvg was not run" in line and "at its one seed (0): FedProx." in line


def test_verdict_table_row_per_method():
    table = verdict_table(_verdicts(GOOD, BEHIND), TOL).splitlines()
    assert table[0] == (
        "| method | within 0.02 of centralized: gap (seeds 0 / 1) | above every local-only model on the other sites'"
        " data: worst margin (seeds 0 / 1) | conclusion |"
    )
    assert (
        table[2] == "| FedAvg | seeds disagree (-0.0100 / -0.0500) | holds (+0.4500 / +0.4500) | **seeds disagree** |"
    )
    assert table[3].startswith("| FedProx | holds (+0.0050 / -0.0050) |") and table[3].endswith("**holds** |")


def test_markdown_table_of_one_seed():
    table = markdown_table(score_table(GOOD, SITES, ["FedAvg", "FedProx"]), SITES).splitlines()
    assert table[0] == "| model | site-1 val | site-2 val | held-out | mean (sites' val) |"
    assert table[-2] == "| FedAvg | 0.9000 | 0.8500 | 0.5000 | 0.8750 |"
    assert len(table) == 2 + 5


def _combined(tmp_path, seeds: dict[str, dict], setting: str = "noniid", methods=("fedavg", "fedprox")):
    from spleen_tools.bench.validity import combine_seeds

    settings = ValiditySettings(methods=methods, seeds=tuple(map(int, seeds)))
    return combine_seeds(setting, seeds, settings, tmp_path)


def test_combined_seeds_give_summary_verdicts_and_a_chart(tmp_path):
    result = _combined(tmp_path, {"0": a_run(0, GOOD), "1": a_run(1, BEHIND)})
    assert result["methods"] == {"fedavg": "FedAvg", "fedprox": "FedProx"} and result["held_by_sites"] == []
    assert result["summary"]["FedAvg"]["mean"]["values"] == [0.875, 0.85]
    assert [r["model"] for r in result["table"]][-2:] == ["FedAvg", "FedProx"]
    assert result["verdicts"]["FedAvg"]["verdict"] == DISAGREE and result["verdicts"]["FedProx"]["verdict"] == HOLDS
    assert "phase_goal" not in result and result["errors"] == {}
    chart = Path(result["plots"]["dice"])
    assert chart == tmp_path / "noniid_dice.png" and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fedbn_is_held_by_the_sites():
    from spleen_tools.bench.arms import keeps_site_layers, method_name

    assert [keeps_site_layers(m) for m in ("fedavg", "fedbn", "fedopt", "fedprox")] == [False, True, False, False]
    assert method_name("fedbn") == "FedBN"


def test_markdown_section_with_seeds_verdicts_and_the_phase_question(tmp_path):
    result = _combined(tmp_path, {"0": a_run(0, BEHIND, phase=True), "1": a_run(1, BEHIND, phase=True)}, "phase")
    assert result["phase_goal"]["meeting"] == ["FedProx"]
    section = markdown_section("phase", result, TOL)
    lines = section.splitlines()
    assert lines[:3] == [
        "## phase",
        "",
        "Contrast phase: site-1 non_contrast, site-2 portal_venous; held-out: cases of every site's phase.",
    ]
    assert "Dice, mean (min-max) over seed(s) 0, 1:" in lines
    assert "| FedAvg | 0.8500 (0.8500-0.8500) | 0.8500 (0.8500-0.8500) | 0.5000 (0.5000-0.5000) |" in section
    assert "**Does FedAvg fall behind pooled training, and which method closes the gap?**" in section
    assert section.count("### seed ") == 2 and section.count("- FedProx: expectations hold.") == 2
    assert section.count("FedAvg: expectations do NOT hold.") == 2 and "Time: centralized 12 s." in section


def test_a_method_held_by_the_sites_is_one_row_of_their_own_copies():
    copies = {
        "site-1": {"site-1": 0.93, "site-2": 0.5, "held_out": 0.6},
        "site-2": {"site-1": 0.4, "site-2": 0.9, "held_out": 0.8},
    }
    assert site_copies_row(copies, SITES) == {"site-1": 0.93, "site-2": 0.9, "held_out": pytest.approx(0.7)}
    one = site_copies_row({"site-1": copies["site-1"]}, SITES)
    assert one["site-1"] == 0.93 and math.isnan(one["site-2"]) and math.isnan(one["held_out"])
    assert copy_name("FedBN", "site-2") == "FedBN at site-2"


def test_markdown_section_notes_methods_held_by_sites_and_errors(tmp_path):
    run = a_run(0, scores((0.9, 0.85), (0.91, 0.86), (0.95, 0.4), (0.3, 0.9)), methods=("FedAvg", "FedBN"))
    run["scores"]["FedBN"] = {"site-1": 0.93, "site-2": 0.9, "held_out": 0.7}
    run["table"] = score_table(run["scores"], SITES, ["FedAvg", "FedBN"])
    run["expectations"]["FedBN"] = check_expectations(run["scores"], SITES, "FedBN")
    run["errors"] = {"fedopt": "noniid FedOpt: the simulator failed (exit 1); see x.log"}
    result = _combined(tmp_path, {"0": run}, methods=("fedavg", "fedbn"))
    assert result["held_by_sites"] == ["FedBN"] and result["errors"] == {"0": run["errors"]}
    section = markdown_section("noniid", result, TOL)
    assert "| FedBN | 0.9300 | 0.9000 | 0.7000 | 0.9150 |" in section
    assert "FedBN: each site keeps its own BatchNorm layers" in section
    assert "held-out is the mean of the sites' copies" in section
    assert "Errors: fedopt: noniid FedOpt: the simulator failed" in section
    assert "gap (seed 0)" in section and "Contrast phase" not in section and "fall behind" not in section


def test_report_and_files_written(tmp_path):
    from spleen_tools.bench.validity import write_outputs

    result = _combined(tmp_path, {"0": a_run(0, GOOD), "1": a_run(1, GOOD)})
    result["seeds"]["0"]["scores"]["FedAvg"]["held_out"] = math.nan
    settings = {"rounds": 10, "local_epochs": 5, "epochs": 50, "sites": 2, "seeds": [0, 1], "tiny": False}
    settings |= {"method_names": {"fedavg": "FedAvg", "fedprox": "FedProx"}, "centralized_tolerance": TOL}
    study = {"study": "validity", "format": 2, "settings": settings, "results": {"noniid": result}}
    report = markdown_report(study)
    assert report.startswith("# Validity study: centralized vs local-only vs FedAvg, FedProx\n")
    assert "data seed(s) 0, 1." in report and "## noniid" in report
    paths = write_outputs(study, tmp_path)
    written = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert written["results"]["noniid"]["seeds"]["0"]["scores"]["FedAvg"]["held_out"] is None
    assert paths["md"].read_text() == report


def _as_format_1(check: dict) -> dict:
    """A check as format 1 recorded it: ``fedavg_*`` keys and a ``fedavg`` figure, no worst margin."""

    def renamed(part: dict) -> dict:
        return {("fedavg" if k == "method" else k): v for k, v in part.items() if k != "worst_margin"}

    second = renamed(check["vs_local"]) | {"comparisons": [renamed(c) for c in check["vs_local"]["comparisons"]]}
    return {
        "fedavg_vs_centralized": renamed(check["vs_centralized"]),
        "fedavg_vs_local": second,
        "holds": check["holds"],
    }


def test_format_1_expectations_read_in_todays_shape():
    today = check_expectations(GOOD, SITES)
    old = _as_format_1(today)
    assert "fedavg" in old["fedavg_vs_local"]["comparisons"][0] and "worst_margin" not in old["fedavg_vs_local"]
    assert expectations_from_format_1(old) == today
    record = {"settings": {"sites": 2, "seed": 3, "settings": ["iid"]}, "iid": {"table": [], "expectations": old}}
    assert recorded_seeds(record, "iid")["3"]["expectations"] == {"FedAvg": today}
    assert recorded_verdicts(record, "iid")["FedAvg"]["verdict"] == HOLDS


def test_site_final_scores_and_kept_copies_read_back(tmp_path):
    from spleen_tools.bench.arms import final_dice, kept_copies, read_events

    kept = [
        '[spleen] {"kind": "info", "site": "site-1", "final_global_model": "/w/site-1/FL_global_model.pt"}',
        '[spleen] {"kind": "info", "site": "site-2", "training": 2, "validation": 1}',
        '[spleen] {"kind": "info", "site": "site-9", "final_global_model": "/elsewhere.pt"}',
    ]
    (tmp_path / "a.log").write_text("\n".join(PROGRESS_LINES + kept) + "\n")
    events = read_events([tmp_path / "a.log"])
    assert final_dice(events, SITES) == {"site-1": 0.8, "site-2": 0.9}
    assert final_dice(events, ["site-1"]) == {"site-1": 0.8}
    assert kept_copies([tmp_path / "a.log", tmp_path / "none.log"], SITES) == {
        "site-1": Path("/w/site-1/FL_global_model.pt")
    }


def test_site_copies_loaded_where_the_sites_say_and_a_missing_one_is_an_error(tmp_path):
    import torch

    from spleen_tools.bench.arms import StudyError, load_site_copies

    lines = []
    for k, site in enumerate(SITES):
        path = tmp_path / site / "FL_global_model.pt"
        path.parent.mkdir()
        torch.save({"model": {"bn.weight": torch.full((2,), float(k))}}, path)
        lines.append(f'[spleen] {{"kind": "info", "site": "{site}", "final_global_model": "{path}"}}')
    log = tmp_path / "site.log"
    log.write_text("\n".join(lines) + "\n")
    copies = load_site_copies([log], SITES, "noniid FedBN")
    assert [copies[site]["bn.weight"].tolist() for site in SITES] == [[0.0, 0.0], [1.0, 1.0]]
    (tmp_path / "site-2" / "FL_global_model.pt").unlink()
    with pytest.raises(StudyError, match="noniid FedBN: site-2 kept no copy of the final global model; see "):
        load_site_copies([log], SITES, "noniid FedBN")


class _NoServer:
    url = "http://127.0.0.1:1"

    def __init__(self, *_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


def test_the_study_story_with_the_training_stubbed(tmp_path, monkeypatch):
    """run_validity over two seeds and two methods (FedBN held by the sites), real tiny data, the arms and the
    scoring stubbed: every seed's result, the copies folded into FedBN's row, the files, a failed method reported."""
    import torch

    from spleen_tools.bench import validity
    from spleen_tools.bench.arms import ArmResult, StudyError

    weights = {"w": torch.zeros(1)}
    curve = [{"epoch": 1, "dice": 0.5, "seconds": 1.0}]
    dice = {"centralized": 0.9, "local site-1": 0.8, "local site-2": 0.7, "FedAvg": 0.88}
    dice |= {"FedBN at site-1": 0.91, "FedBN at site-2": 0.89}

    def fl(data, method, *args, **kwargs):
        if method == "fedbn":
            return ArmResult(site_models={"FedBN": {s: weights for s in data.site_names}}, seconds={"FedBN": 2.0})
        if kwargs["experiment"].startswith("validity-phase-seed-1"):
            raise StudyError("phase FedAvg: the simulator failed (exit 1); see x.log")
        return ArmResult({"FedAvg": weights}, {"FedAvg": [{"round": 0, "epoch": 0, "dice": 0.1}]}, {"FedAvg": 3.0})

    def score(models, sets, *args):
        return {name: {column: dice[name] for column in sets} for name in models}

    monkeypatch.setattr(validity, "MLflowServer", _NoServer)
    monkeypatch.setattr(
        validity, "run_centralized", lambda *a: ArmResult({"centralized": weights}, {"centralized": curve})
    )
    monkeypatch.setattr(validity, "run_local", lambda d, *a: ArmResult({f"local {s}": weights for s in d.site_names}))
    monkeypatch.setattr(validity, "run_fl", fl)
    monkeypatch.setattr(validity, "score_models", score)
    settings = ValiditySettings(settings=("phase",), seeds=(0, 1), methods=("fedavg", "fedbn"), tiny=True)
    study = validity.run_validity(settings, tmp_path, log=lambda msg: None)

    result = study["results"]["phase"]
    assert list(result["seeds"]) == ["0", "1"] and result["held_by_sites"] == ["FedBN"]
    first, second = result["seeds"]["0"], result["seeds"]["1"]
    assert first["scores"]["FedBN"] == {"site-1": 0.91, "site-2": 0.89, "held_out": pytest.approx(0.9)}
    assert first["site_copies"]["FedBN"]["site-2"]["site-1"] == 0.89
    assert "FedAvg" not in second["scores"] and result["errors"] == {"1": {"fedavg": second["errors"]["fedavg"]}}
    assert result["summary"]["FedAvg"]["site-1"]["values"] == [0.88, None]
    assert result["verdicts"]["FedAvg"]["verdict"] == UNJUDGED  # seed 0 holds, seed 1 has no FedAvg: no conclusion
    assert result["verdicts"]["FedAvg"]["vs_centralized"]["gaps"] == {"0": -0.02, "1": None}
    assert result["verdicts"]["FedBN"]["verdict"] == HOLDS and result["phase_goal"]["meeting"] == ["FedBN"]
    assert sorted(p.name for p in (tmp_path / "work" / "phase" / "seed-0" / "models").glob("*.pt")) == [
        "FedAvg.pt",
        "FedBN_at_site-1.pt",
        "FedBN_at_site-2.pt",
        "centralized.pt",
        "local_site-1.pt",
        "local_site-2.pt",
    ]
    assert {Path(p).name for p in first["plots"].values()} == {
        f"phase_seed-0_{arm}_curves.png" for arm in ("centralized", "local", "fedavg", "fedbn")
    }
    written = json.loads((tmp_path / "validity.json").read_text())
    assert written["format"] == 2 and written["settings"]["seeds"] == [0, 1]
    assert [r["model"] for r in written["results"]["phase"]["seeds"]["1"]["table"]][-2:] == ["local site-2", "FedBN"]
    assert (tmp_path / "phase_dice.png").is_file() and "## phase" in (tmp_path / "validity.md").read_text()


def test_fl_curves_read_back(tmp_path):
    from spleen_tools.bench.arms import fl_curves, read_events

    lines = PROGRESS_LINES
    (tmp_path / "a.log").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.log").write_text("\n".join(lines[:3]) + "\n")  # the same lines in a second log count once
    events = read_events([tmp_path / "a.log", tmp_path / "b.log", tmp_path / "missing.log"])
    assert len(events) == 6
    curves = fl_curves(events, SITES, local_epochs=5)
    assert curves["FedAvg"] == [
        {"round": 0, "epoch": 0, "dice": 0.02},
        {"round": 1, "epoch": 5, "dice": 0.6},
        {"round": 2, "epoch": 10, "dice": 0.85},
    ]
    assert [p["dice"] for p in curves["FedAvg on site-2"]] == [0.03, 0.7, 0.9]
    assert set(fl_curves(events, SITES, 5, "FedProx")) == {"FedProx", "FedProx on site-1", "FedProx on site-2"}


def test_curve_png(tmp_path):
    from spleen_tools.bench.study_plots import plot_arm_curves

    curves = {"local site-1": [{"epoch": 1, "dice": 0.2}, {"epoch": 2, "dice": 0.6}], "empty": []}
    path = plot_arm_curves(curves, tmp_path / "c.png", "iid: local-only")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
