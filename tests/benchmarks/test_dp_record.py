"""The DP utility study and the signal-to-noise measurement as recorded (benchmark commands, not tests) and as the
README states them; the BENCHMARKS section renders them."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import dp_utility  # noqa: E402
import write_benchmarks_md  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
UTILITY = json.loads((RESULTS / "dp_utility.json").read_text())
NOISE = json.loads((RESULTS / "dp_signal_to_noise.json").read_text())


def test_every_dp_arm_reached_its_epsilon_and_the_readme_states_the_figures():
    summary = UTILITY["result"]["summary"]["iid"]
    for name, row in summary.items():
        if name != "no DP":
            assert abs(row["epsilon"] - float(name.split()[1])) < 0.02, name  # planned noise ends at the target
    readme = " ".join((REPO / "README.md").read_text().split())
    dp = ", ".join(f"{summary[f'epsilon {e}']['mean_sites']:.3f}" for e in ("1", "3", "8"))
    claim = f"reaches Dice {summary['no DP']['mean_sites']:.3f}; with DP-SGD at epsilon 1, 3, 8 and 30 it reaches {dp}"
    assert claim + f" and {summary['epsilon 30']['mean_sites']:.3f}" in readme
    others, epochs = UTILITY["result"]["summary"], {True: [], False: []}
    for setting, words in (("noniid", "Non-IID (10 and 6 cases)"), ("phase", "contrast phase")):
        dp = [row for name, row in others[setting].items() if name != "no DP"]
        best = max(row["mean_sites"] for row in dp)
        assert f"{words}: {others[setting]['no DP']['mean_sites']:.3f} without DP, at most {best:.3f} with" in readme
        epochs[True] += [row["site_epoch_s"] for row in dp]
        epochs[False].append(others[setting]["no DP"]["site_epoch_s"])
    ratios = [d / min(epochs[False]) for d in epochs[True]] + [d / max(epochs[False]) for d in epochs[True]]
    spans = [f"{min(epochs[k]):.1f}-{max(epochs[k]):.1f} s" for k in (True, False)]
    assert f"{min(ratios):.1f}-{max(ratios):.1f}x as long ({spans[0]} against {spans[1]})" in readme
    last = NOISE["result"]["rows"][-1]
    assert f"{last['noise_to_signal']:.0f} times the clipped gradient even at epsilon 30" in readme
    assert round(last["steps_to_average_out"] / 1e6, 1) == 3.8 and "3.8 million steps" in readme


def test_the_benchmarks_page_renders_both():
    text = "\n".join(write_benchmarks_md.dp_utility(UTILITY) + write_benchmarks_md.dp_signal_to_noise(NOISE))
    assert UTILITY["command"] in text and NOISE["command"] in text
    assert "| no DP | 0.9371 |" in text and "![Dice against epsilon, and without DP](images/dp_utility.png)" in text


def test_a_study_of_other_settings_extends_the_record_and_the_page_names_each_run():
    result = UTILITY["result"]
    first, *others = result["results"]
    alone = {k: v for k, v in result.items() if k not in ("runs", "results", "summary")}
    alone = alone | {"settings": result["settings"] | {"settings": first}, "note": "Shared the cores."}
    base = {**UTILITY, "result": alone | {k: {first: result[k][first]} for k in ("results", "summary")}}
    study = copy.deepcopy(alone) | {"settings": result["settings"] | {"settings": ",".join(others)}, "seconds": 100.0}
    study |= {k: {s: result[k][s] for s in others} for k in ("results", "summary")} | {"note": "Nothing else ran."}
    merged = dp_utility.extended(study, base)
    assert merged["results"] == result["results"] and merged["summary"] == result["summary"]
    assert merged["settings"]["settings"] == ",".join(result["results"])
    assert [r["settings"] for r in merged["runs"]] == [first, ",".join(others)]
    assert [r["note"] for r in merged["runs"]] == ["Shared the cores.", "Nothing else ran."]
    assert merged["runs"][0]["machine"] == UTILITY["machine"] and merged["runs"][1]["seconds"] == 100.0
    assert f"--settings {merged['settings']['settings']} " in dp_utility.study_command(merged["settings"])
    text = "\n".join(write_benchmarks_md.dp_utility({**UTILITY, "result": merged}))
    assert all(f"### {s}" in text for s in result["results"]) and f"runs of the same options: {first} on " in text
    with pytest.raises(SystemExit, match=f"already holds {others[0]}"):
        dp_utility.extended(study, {**UTILITY, "result": merged})
    with pytest.raises(SystemExit, match="recorded with other rounds"):
        dp_utility.extended(study | {"settings": study["settings"] | {"rounds": 3}}, base)


def test_the_record_holds_every_setting_of_the_validity_study():
    assert list(UTILITY["result"]["results"]) == ["iid", "noniid", "phase"]
    assert [r["settings"] for r in UTILITY["result"]["runs"]] == ["iid", "noniid,phase"]


def test_the_dp_docs_table_is_the_record():
    docs = (REPO / "docs" / "differential_privacy.md").read_text()
    for setting, words in (("iid", "IID (6, 6)"), ("noniid", "non-IID (10, 6)"), ("phase", "contrast phase (10, 6)")):
        figures = " | ".join(f"{row['mean_sites']:.3f}" for row in UTILITY["result"]["summary"][setting].values())
        assert f"| {words} | {figures} |" in docs, setting
