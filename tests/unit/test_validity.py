"""The validity study's fast pieces: tables, the expectations check, the study data, the curves, the CLI's input."""

from __future__ import annotations

import json
import math
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
from spleen_tools.bench.study_report import check_expectations, markdown_section, markdown_table, score_table
from spleen_tools.bench.study_settings import DATA_SETTINGS, ValiditySettings
from spleen_tools.cli import bench as cli

SITES = ["site-1", "site-2"]
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


def scores(fed: tuple[float, float], cen: tuple[float, float], l1: tuple[float, float], l2: tuple[float, float]):
    """Scores of the four models on (site-1, site-2); held-out is 0.5 for everyone."""
    rows = {"FedAvg": fed, "centralized": cen, "local site-1": l1, "local site-2": l2}
    return {model: {"site-1": a, "site-2": b, "held_out": 0.5} for model, (a, b) in rows.items()}


def test_table_rows_are_ordered_and_mean_is_over_sites_validation():
    table = score_table(scores((0.9, 0.8), (0.92, 0.84), (0.95, 0.4), (0.3, 0.9)), SITES)
    assert [row["model"] for row in table] == ["centralized", "local site-1", "local site-2", "FedAvg"]
    fed = table[-1]
    assert fed["site-1"] == 0.9 and fed["held_out"] == 0.5 and fed["mean"] == pytest.approx(0.85)


def test_table_with_a_missing_model_score_has_no_mean():
    table = score_table({"FedAvg": {"site-1": 0.9}}, SITES)
    assert math.isnan(table[0]["site-2"]) and math.isnan(table[0]["mean"])


def test_local_models_sort_by_site_number():
    names = {f"local site-{i}": {} for i in (10, 2, 1)}
    assert [r["model"] for r in score_table(names, SITES)] == ["local site-1", "local site-2", "local site-10"]


def test_expectations_hold():
    result = check_expectations(scores((0.9, 0.85), (0.91, 0.86), (0.95, 0.4), (0.3, 0.9)), SITES)
    assert result["holds"]
    assert result["fedavg_vs_centralized"]["gap"] == pytest.approx(-0.01)
    comparisons = result["fedavg_vs_local"]["comparisons"]
    assert [(c["local_model"], c["on"]) for c in comparisons] == [
        ("local site-1", "site-2"),
        ("local site-2", "site-1"),
    ]


def test_fedavg_more_than_tolerance_below_centralized_fails():
    result = check_expectations(scores((0.85, 0.85), (0.9, 0.86), (0.95, 0.4), (0.3, 0.9)), SITES)
    assert not result["fedavg_vs_centralized"]["holds"] and result["fedavg_vs_local"]["holds"]
    assert not result["holds"]


def test_a_local_model_better_on_another_site_fails():
    # local site-1 beats FedAvg on site-2's data; its score on its own site does not count.
    result = check_expectations(scores((0.9, 0.85), (0.9, 0.86), (0.99, 0.87), (0.3, 0.99)), SITES)
    assert result["fedavg_vs_centralized"]["holds"] and not result["fedavg_vs_local"]["holds"]
    failed = [c for c in result["fedavg_vs_local"]["comparisons"] if not c["holds"]]
    assert [(c["local_model"], c["on"]) for c in failed] == [("local site-1", "site-2")]


def test_missing_fedavg_never_holds():
    result = check_expectations({"centralized": {"site-1": 0.9, "site-2": 0.9}}, SITES)
    assert not result["holds"] and result["fedavg_vs_centralized"]["fedavg"] is None


def test_markdown_table_and_section():
    values = scores((0.9, 0.85), (0.91, 0.86), (0.95, 0.4), (0.3, 0.9))
    table = markdown_table(values, SITES).splitlines()
    assert table[0] == "| model | site-1 val | site-2 val | held-out | mean (sites' val) |"
    assert table[-1] == "| FedAvg | 0.9000 | 0.8500 | 0.5000 | 0.8750 |"
    assert len(table) == 2 + 4
    result = {"sites": SITES, "scores": values, "expectations": check_expectations(values, SITES)}
    section = markdown_section("iid", result | {"seconds": {"centralized": 12.3}})
    assert section.startswith("## iid") and "Expectations hold." in section
    values["FedAvg"]["site-1"] = 0.2
    result = {"sites": SITES, "scores": values, "expectations": check_expectations(values, SITES), "seconds": {}}
    assert "does NOT hold" in markdown_section("noniid", result) and "local site-2 on site-1" in markdown_section(
        "noniid", result
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


def test_markdown_section_names_the_sites_phases():
    values = scores((0.9, 0.85), (0.91, 0.86), (0.95, 0.4), (0.3, 0.9))
    result = {"sites": SITES, "scores": values, "expectations": check_expectations(values, SITES), "seconds": {}}
    styles = {"site-1": {"phase": "non_contrast"}, "site-2": {"phase": "portal_venous"}}
    data = {"sites": {site: {"training": 2, "validation": 1, "style": style} for site, style in styles.items()}}
    section = markdown_section("phase", result | {"data": data}).splitlines()
    assert section[:3] == [
        "## phase",
        "",
        "Contrast phase: site-1 non_contrast, site-2 portal_venous; held-out: cases of every site's phase.",
    ]
    for style in styles.values():
        style.pop("phase")
    assert "Contrast phase" not in markdown_section("noniid", result | {"data": data})


def test_fedavg_curves_read_back(tmp_path):
    from spleen_tools.bench.arms import fedavg_curves, read_events

    lines = PROGRESS_LINES
    (tmp_path / "a.log").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.log").write_text("\n".join(lines[:3]) + "\n")  # the same lines in a second log count once
    events = read_events([tmp_path / "a.log", tmp_path / "b.log", tmp_path / "missing.log"])
    assert len(events) == 6
    curves = fedavg_curves(events, SITES, local_epochs=5)
    assert curves["FedAvg"] == [
        {"round": 0, "epoch": 0, "dice": 0.02},
        {"round": 1, "epoch": 5, "dice": 0.6},
        {"round": 2, "epoch": 10, "dice": 0.85},
    ]
    assert [p["dice"] for p in curves["FedAvg on site-2"]] == [0.03, 0.7, 0.9]


def test_curve_png(tmp_path):
    from spleen_tools.bench.study_plots import plot_arm_curves

    curves = {"local site-1": [{"epoch": 1, "dice": 0.2}, {"epoch": 2, "dice": 0.6}], "empty": []}
    path = plot_arm_curves(curves, tmp_path / "c.png", "iid: local-only")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_epochs_and_tiny_defaults():
    assert ValiditySettings().epochs == 50
    args = cli.build_parser().parse_args(["validity", "--tiny"])
    settings = cli.settings_from(args)
    assert (settings.rounds, settings.local_epochs, settings.tiny) == (1, 1, True)
    args = cli.build_parser().parse_args(["validity", "--rounds", "3", "--settings", "noniid"])
    assert cli.settings_from(args).epochs == 15 and cli.settings_from(args).settings == ("noniid",)


def test_phase_setting_is_accepted_but_not_run_by_default():
    assert DATA_SETTINGS == ("iid", "noniid", "phase")
    assert ValiditySettings().settings == ("iid", "noniid")
    assert cli.settings_from(cli.build_parser().parse_args(["validity"])).settings == ("iid", "noniid")
    args = cli.build_parser().parse_args(["validity", "--tiny", "--settings", "phase"])
    assert cli.settings_from(args).settings == ("phase",)
    args = cli.build_parser().parse_args(["validity", "--settings", "iid,noniid,phase"])
    assert cli.settings_from(args).settings == DATA_SETTINGS


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["validity", "--rounds", "0"], "--rounds must be at least 1"),
        (["validity", "--local-epochs", "-2"], "--local-epochs must be at least 1"),
        (["validity", "--sites", "1"], "--sites must be between 2 and 8"),
        (["validity", "--settings", "iid,weird"], "unknown data setting 'weird': expected iid, noniid, phase"),
        (["validity", "--settings", "phase,phase"], "lists a setting twice"),
        (["validity", "--settings", ","], "--settings needs at least one"),
        (["validity", "--settings", "iid,iid"], "lists a setting twice"),
        (["validity", "--seed", "-1"], "--seed must be 0 or more"),
        (["validity", "--rounds", "two"], "invalid int value"),
        (["validity", "--bogus"], "unrecognized arguments"),
        (["fancy"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(cli.main([*argv, "--out", str(out)] if argv and argv[0] == "validity" else argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not out.exists(), "bad input must not make an output folder"


def test_out_must_be_new_or_empty(capsys, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    assert cli.main(["validity", "--tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "not an empty folder" in err and err.count("\n") == 1
