"""The dataset check on real NIfTI files: a good synthetic dataset passes; each kind of damage is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_tools.cli.check_data import main as check_main
from spleen_tools.data.check import check_dataset
from spleen_tools.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), num_train=6, num_test=0, shape=(32, 32, 10))


@pytest.fixture
def data(good, tmp_path) -> Path:
    copy = tmp_path / "Task09_Spleen"
    shutil.copytree(good, copy)
    return copy


def _cases(data: Path) -> list[tuple[Path, Path]]:
    training = json.loads((data / "dataset.json").read_text())["training"]
    return [((data / c["image"]).resolve(), (data / c["label"]).resolve()) for c in training]


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def test_a_good_dataset_passes(good, capsys):
    assert check_dataset(good, num_sites=2) == []
    assert check_main([str(good), "--sites", "2"]) == 0
    assert "fine" in capsys.readouterr().out


def test_every_problem_is_one_line_naming_its_file(data, capsys):
    (_, lab0), (_, lab1), (img2, _), (img3, _), (img4, lab4), _ = _cases(data)
    label = nib.load(lab0)
    _rewrite(lab0, np.asanyarray(label.dataobj)[:-5], label.affine)  # 5 voxels short along x
    shifted = label.affine.copy()
    shifted[0, 3] += 7.5
    _rewrite(lab1, np.asanyarray(nib.load(lab1).dataobj), shifted)
    img3.write_bytes(img3.read_bytes()[:300])  # truncated
    _rewrite(img2, np.asanyarray(nib.load(img2).dataobj) / 3000.0 + 0.5, nib.load(img2).affine)  # normalised
    lab4.unlink()
    problems = check_dataset(data, num_sites=2)
    assert len(problems) == 1 and "missing" in problems[0]  # files first: nothing else is read
    _rewrite(lab4, np.zeros(nib.load(img4).shape, np.uint8), nib.load(img4).affine)  # back: an empty label is fine
    problems = check_dataset(data, num_sites=2)
    assert check_main([str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {p}" for p in problems]
    assert any(p.startswith(f"{lab0}: shape") for p in problems)
    assert any(p.startswith(f"{lab1}: its affine") for p in problems)
    assert any(p.startswith(f"{img2}: intensities") for p in problems)
    assert any(p.startswith(f"{img3}: not a readable NIfTI") for p in problems)
    assert len(problems) == 4  # a label whose image failed is not read


def test_label_values_and_too_few_cases_for_the_sites(data):
    (img, lab), *_ = _cases(data)
    values = np.asanyarray(nib.load(lab).dataobj).astype(np.int16)
    values[0, 0, 0] = 2
    _rewrite(lab, values, nib.load(lab).affine)
    problems = check_dataset(data, num_sites=4)
    assert problems[0].startswith(f"{lab}: holds values 0, 1, 2")
    assert "4 sites need at least 8 training cases" in problems[1] and "fewer sites" in problems[1]


def test_malformed_dataset_json_entries_are_one_line_each(data, capsys):
    meta = data / "dataset.json"
    listing = json.loads(meta.read_text())
    listing["training"][1] = {"label": listing["training"][1]["label"]}  # no image
    listing["training"][3] = listing["training"][3]["image"]  # a string, not an entry
    meta.write_text(json.dumps(listing))
    assert check_main([str(data), "--sites", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"error: {meta.resolve()}: training entry 1 ({{'label': ")
    assert err[1].startswith(f"error: {meta.resolve()}: training entry 3 ('")
    assert all("is not {'image': path, 'label': path}; give every case both paths" in line for line in err)
    listing["training"] = {"image": "x"}
    meta.write_text(json.dumps(listing))
    (problem,) = check_dataset(data)
    assert problem.startswith(f"{meta.resolve()}: 'training' is not a list of cases")
