"""The validity study's data (spleen_tools.bench.study_data): IID, non-IID and contrast-phase sites, their
datalists and held-out cases, written as real NIfTI files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_tools.bench.study_data import (
    STYLE_FIRST,
    STYLE_LAST,
    TINY_STYLE_FIRST,
    TINY_STYLE_LAST,
    make_iid_data,
    make_noniid_data,
    make_study_data,
    phase_styles,
    site_styles,
)


def test_site_styles_span_first_to_last():
    two = site_styles(2)
    assert two == [STYLE_FIRST, STYLE_LAST]
    three = site_styles(3)
    assert three[1].intensity_offset == 30.0 and three[1].spacing[2] == 4.0 and three[1].shape == (104, 104, 28)


def _check_datalists(data, num_sites: int) -> None:
    seen: list[str] = []
    for site in data.site_names:
        lists = json.loads((data.datalist_dir / f"{site}.json").read_text())
        assert (lists["training"], lists["validation"]) == data.sites[site]
        assert lists["training"] and lists["validation"]
        for case in lists["training"] + lists["validation"]:
            assert Path(case["image"]).is_absolute() and Path(case["image"]).is_file() and Path(case["label"]).is_file()
            seen.append(case["image"])
    held = [c["image"] for c in data.held_out]
    assert held and len(set(seen)) == len(seen) and not set(held) & set(seen)  # disjoint: nobody trains on held-out
    assert len(data.site_names) == num_sites


def _spleen_hu(case: dict) -> float:
    image, label = (np.asarray(nib.load(case[k]).dataobj) for k in ("image", "label"))
    return float(image[label == 1].mean())


def _phase_of(case: dict) -> str | None:
    """The contrast phase the generator wrote into the case's dataset.json."""
    meta = json.loads((Path(case["image"]).parents[1] / "dataset.json").read_text())
    return meta.get("contrast_phase")


def test_iid_data_layout(tmp_path):
    data = make_iid_data(tmp_path / "iid", 2, seed=0, tiny=True)
    _check_datalists(data, 2)
    assert [len(tr) for tr, _ in data.sites.values()] == [2, 2] and len(data.held_out) == 2
    # held-out cases are other cases than the sites', not copies under another name
    site_img = np.asarray(nib.load(data.sites["site-1"][0][0]["image"]).dataobj)
    held_img = np.asarray(nib.load(data.held_out[0]["image"]).dataobj)
    assert site_img.shape != held_img.shape or not np.array_equal(site_img, held_img)


def test_noniid_sites_differ_in_offset_spacing_shape_and_count(tmp_path):
    data = make_noniid_data(tmp_path / "noniid", 2, seed=0)
    _check_datalists(data, 2)
    (tr1, va1), (tr2, va2) = data.sites.values()
    assert (len(tr1) + len(va1), len(tr2) + len(va2)) == (STYLE_FIRST.cases, STYLE_LAST.cases)
    assert len(data.held_out) == 4  # two of each style
    img1, img2 = nib.load(tr1[0]["image"]), nib.load(tr2[0]["image"])
    assert np.allclose(img1.header.get_zooms(), STYLE_FIRST.spacing)
    assert np.allclose(img2.header.get_zooms(), STYLE_LAST.spacing)
    assert img1.shape[:2] == STYLE_FIRST.shape[:2] and img2.shape[:2] == STYLE_LAST.shape[:2]

    offset = STYLE_LAST.intensity_offset
    assert _spleen_hu(tr2[0]) - _spleen_hu(tr1[0]) == pytest.approx(offset, abs=30)  # spleen 100-130 HU + offset
    held_spacings = {nib.load(c["image"]).header.get_zooms()[2] for c in data.held_out}
    assert held_spacings == {STYLE_FIRST.spacing[2], STYLE_LAST.spacing[2]}


def test_phase_styles_are_the_noniid_styles_without_offset():
    three = phase_styles(3)
    assert [s.phase for s in three] == ["non_contrast", "portal_venous", "portal_venous"]
    assert all(s.intensity_offset == 0.0 for s in three)
    assert [(s.spacing, s.shape, s.cases) for s in three] == [(s.spacing, s.shape, s.cases) for s in site_styles(3)]
    assert all(s.phase is None for s in site_styles(3))


def test_phase_sites_differ_in_contrast_phase_and_held_out_has_both(tmp_path):
    data = make_study_data("phase", tmp_path / "phase", 2, seed=0, tiny=True)
    _check_datalists(data, 2)
    assert data.setting == "phase"
    (tr1, va1), (tr2, va2) = data.sites.values()
    assert {_phase_of(c) for c in tr1 + va1} == {"non_contrast"}
    assert {_phase_of(c) for c in tr2 + va2} == {"portal_venous"}
    assert all(_spleen_hu(c) < 60 for c in tr1 + va1)  # non-contrast spleen 40-50 HU, no offset
    assert all(_spleen_hu(c) > 110 for c in tr2 + va2)  # portal venous 120-160 HU
    # Spacing and field of view as the non-IID styles.
    assert nib.load(tr1[0]["image"]).header.get_zooms()[2] == TINY_STYLE_FIRST.spacing[2]
    assert nib.load(tr2[0]["image"]).shape[:2] == TINY_STYLE_LAST.shape[:2]
    held = {_phase_of(c): _spleen_hu(c) for c in data.held_out}
    assert set(held) == {"non_contrast", "portal_venous"} and held["non_contrast"] < 60 < 110 < held["portal_venous"]
    described = data.describe()
    assert [d["style"]["phase"] for d in described["sites"].values()] == ["non_contrast", "portal_venous"]
    assert all(d["style"]["intensity_offset"] == 0.0 for d in described["sites"].values())
    assert "non_contrast" in described["held_out_styles"]["site-1"]


def test_noniid_styles_name_no_phase(tmp_path):
    data = make_noniid_data(tmp_path / "noniid", 2, seed=0, tiny=True)
    assert all("phase" not in d["style"] for d in data.describe()["sites"].values())
    assert {_phase_of(c) for c in data.held_out} == {None}
