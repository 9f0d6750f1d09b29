"""The job side's contract: one tagged-line format, written by one function and read by one function."""

from __future__ import annotations

import json

import pytest

from spleen_flare.contract import HE_TAG, PROGRESS_TAG, read_tagged_line, tagged_line


def test_round_trip_with_log_prefix_and_rounding():
    line = tagged_line(PROGRESS_TAG, kind="round", site="site-1", round=2, loss=0.123456789, path="/a b/c")
    assert line.startswith('[spleen] {"kind": "round"')
    prefixed = "2026-11-29 03:00:01,250 - ClientAPI - INFO - " + line
    assert read_tagged_line(prefixed) == (
        PROGRESS_TAG,
        {"kind": "round", "site": "site-1", "round": 2, "loss": 0.1235, "path": "/a b/c"},
    )


def test_non_finite_numbers_become_null_and_stay_strict_json():
    line = tagged_line(HE_TAG, side="site-1", stage="encrypt", seconds=float("nan"), ratio=float("inf"))
    json.loads(line[len(HE_TAG) + 1 :])  # strict: no NaN/Infinity tokens
    assert read_tagged_line(line) == (HE_TAG, {"side": "site-1", "stage": "encrypt", "seconds": None, "ratio": None})


@pytest.mark.parametrize(
    "line",
    [
        "",
        "no tag",
        "[spleen]",
        "[spleen] site=site-1 round=0",
        "[spleen] {broken",
        "[spleen] [1, 2]",
        '[spleenx] {"a": 1}',
    ],
)
def test_other_lines_are_not_tagged_lines(line):
    assert read_tagged_line(line) is None


def test_unknown_tag_is_refused():
    with pytest.raises(ValueError, match="unknown tag"):
        tagged_line("[other]", a=1)
