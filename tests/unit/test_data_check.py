"""A site's own check of its cases (``spleen_flare.data_check``, run by ``client_train`` at job start), and how its
lines reach the one command: a ``data_error`` progress line per problem, collected, printed first as the cause."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_flare.client_train import SiteDataError, check_site_cases
from spleen_flare.data_check import case_problems
from spleen_tools.data.synthetic import make_synthetic_dataset
from spleen_tools.flare import TERMINAL_OK
from spleen_tools.run.progress import Progress, parse_event
from spleen_tools.run.summary import problems


@pytest.fixture
def cases(tmp_path) -> list[dict]:
    data = make_synthetic_dataset(tmp_path / "data", num_train=3, num_test=0, shape=(24, 24, 8))
    training = json.loads((data / "dataset.json").read_text())["training"]
    return [{k: str((data / c[k]).resolve()) for k in ("image", "label")} for c in training]


def test_good_cases_pass_and_each_bad_one_is_a_line(cases):
    assert case_problems(cases) == []
    short = Path(cases[0]["label"])
    label = nib.load(short)
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj)[:-5], label.affine), short)  # 5 voxels short along x
    twos = Path(cases[1]["label"])
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(twos).dataobj) * 2, nib.load(twos).affine), twos)
    cut = Path(cases[2]["image"])
    cut.write_bytes(cut.read_bytes()[:200])  # truncated: its label is not read
    found = case_problems(cases)
    assert len(found) == 3
    shape = tuple(nib.load(cases[0]["image"]).shape)
    assert found[0].startswith(f"{short}: shape {(shape[0] - 5, *shape[1:])} differs from its image's {shape}")
    assert found[1].startswith(f"{twos}: holds values 0, 2") and "0 and 1 only" in found[1]
    assert found[2].startswith(f"{cut}: not a readable NIfTI")


def test_a_site_prints_every_problem_then_stops(cases, capsys):
    check_site_cases("site-1", cases)  # fine: nothing printed
    assert capsys.readouterr().out == ""
    bad = Path(cases[1]["label"])
    label = nib.load(bad)
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj).astype(np.int16) * 255, label.affine), bad)  # 0/255
    with pytest.raises(SiteDataError, match=r"site-1: 1 problem\(s\)"):
        check_site_cases("site-1", cases)
    lines = capsys.readouterr().out.splitlines()
    events = [parse_event(line) for line in lines]
    assert len(events) == 1 and events[0]["kind"] == "data_error" and events[0]["site"] == "site-1"
    assert events[0]["problem"].startswith(f"{bad}: holds values")

    # the one command: the line as it arrives (twice: site log and job log), then the run's verdict
    progress = Progress(["site-1", "site-2"], 1)
    printed = progress.add(events[0]) + progress.add(dict(events[0]))
    assert len(printed) == 1 and printed[0].endswith(f"site-1: {events[0]['problem']}")
    summary = {"status": "FINISHED:EXECUTION_EXCEPTION", "cross_site": None, "data_errors": progress.data_errors}
    assert problems(summary, ["site-1", "site-2"], TERMINAL_OK) == [
        f"site-1: {events[0]['problem']}",
        "job ended FINISHED:EXECUTION_EXCEPTION",
        "no cross-site results in the downloaded job",
    ]
