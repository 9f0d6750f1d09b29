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
    last = NOISE["result"]["rows"][-1]
    assert f"{last['noise_to_signal']:.0f} times the clipped gradient even at epsilon 30" in readme
    assert round(last["steps_to_average_out"] / 1e6, 1) == 3.8 and "3.8 million steps" in readme


def test_the_benchmarks_page_renders_both():
    text = "\n".join(write_benchmarks_md.dp_utility(UTILITY) + write_benchmarks_md.dp_signal_to_noise(NOISE))
    assert UTILITY["command"] in text and NOISE["command"] in text
    assert "| no DP | 0.9371 |" in text and "![Dice against epsilon, and without DP](images/dp_utility.png)" in text


def test_a_study_of_other_settings_extends_the_record_and_the_page_names_each_run():
    study = copy.deepcopy(UTILITY["result"])
    iid = next(iter(study["results"]))
    study = {
        "settings": study["settings"] | {"settings": "phase"},
        "results": {"phase": study["results"][iid]},
        "summary": {"phase": study["summary"][iid]},
        "seconds": 100.0,
        "note": "Nothing else ran.",
    }
    merged = dp_utility.extended(study, UTILITY)
    assert list(merged["results"]) == [*UTILITY["result"]["results"], "phase"]
    assert merged["settings"]["settings"] == ",".join(merged["results"])
    assert [r["settings"] for r in merged["runs"]][-1] == "phase" and merged["runs"][-1]["note"] == "Nothing else ran."
    assert merged["seconds"] == round(sum(r["seconds"] for r in merged["runs"]), 1)
    assert f"--settings {merged['settings']['settings']} " in dp_utility.study_command(merged["settings"])
    text = "\n".join(write_benchmarks_md.dp_utility({**UTILITY, "result": merged}))
    assert "### phase" in text and f"runs of the same options: {merged['runs'][0]['settings']} on " in text
    with pytest.raises(SystemExit, match="already holds phase"):
        dp_utility.extended(study, {**UTILITY, "result": merged})
    with pytest.raises(SystemExit, match="recorded with other rounds"):
        dp_utility.extended(study | {"settings": study["settings"] | {"rounds": 3}}, UTILITY)
