"""A site's CT statistics (``spleen_flare.ct_statistics``) on real NIfTI phantoms: each figure checked against the
arrays written, the same scan in another orientation, the histograms NVFlare asks for, the site's start (its data
check, its install check) and the spec's figures as NVFlare's own task handler sends them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ct_phantoms import (
    BODY,
    HU_AIR,
    HU_TABLE,
    ORIGIN,
    SHAPE,
    SPACING,
    TABLE,
    phantom,
    ras_affine,
    save,
    write_case,
    write_datalist,
)
from nvflare.app_common.abstract.statistics_spec import HistogramType
from nvflare.app_common.app_constant import StatisticsConstants as StC
from stats_tasks import both_tasks, job_statistic_configs, site_context, statistics_of

from spleen_flare import __version__
from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV, JOB_VERSION_KEY, read_tagged_line
from spleen_flare.ct_statistics import (
    CASE_FEATURES,
    CASES,
    HU_RANGE,
    INTENSITY,
    INTENSITY_FEATURES,
    SpleenCTStatistics,
    StatisticsDataError,
    body_mask,
    case_figures,
    hu_histogram,
    site_cases,
)

# per case: (seed, slices, spacing); different sizes and spacings, so that the per-case figures spread
CASE_SPECS = ((0, 10, (0.7, 0.8, 2.0)), (1, 12, (0.8, 0.9, 2.5)), (2, 14, (0.9, 1.0, 3.0)))


def written_cases(folder: Path) -> list[dict[str, str]]:
    return [
        write_case(folder, f"case_{seed}", *phantom(seed, nz=nz), spacing=spacing) for seed, nz, spacing in CASE_SPECS
    ]


def generator_of(cases: list[dict[str, str]]) -> SpleenCTStatistics:
    """A generator holding the cases' figures, as its initialize() leaves it."""
    generator = SpleenCTStatistics()
    generator.cases = [case_figures(Path(c["image"]), Path(c["label"]) if c.get("label") else None) for c in cases]
    return generator


def loaded(path: str | Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def body_values(image: np.ndarray) -> np.ndarray:
    """The phantom's body voxels (its box: every voxel of it lies above -500 HU), by index, not by threshold."""
    return image[BODY].ravel()


def tagged_lines(out: str) -> list[dict]:
    return [read_tagged_line(line)[1] for line in out.splitlines() if read_tagged_line(line)]


# ---- one case's figures


def test_case_figures_are_the_arrays_figures(tmp_path):
    image, label = phantom(seed=3, nz=10)
    spacing = (0.7, 0.9, 3.0)
    case = write_case(tmp_path, "case", image, label, spacing=spacing)
    figures = case_figures(Path(case["image"]), Path(case["label"]))
    v = figures.values
    assert [v["spacing_x_mm"], v["spacing_y_mm"], v["spacing_z_mm"]] == pytest.approx(spacing)
    assert [v["size_x"], v["size_y"], v["size_z"]] == [48.0, 48.0, 10.0]
    read_image, read_label = loaded(case["image"]), loaded(case["label"])
    voxel_ml = math.prod(nib.load(case["image"]).header.get_zooms()[:3]) / 1000.0
    assert v["spleen_volume_ml"] == pytest.approx(read_label.sum() * voxel_ml)
    assert v["spleen_volume_ml"] == pytest.approx(8 * 8 * 6 * 0.7 * 0.9 * 3.0 / 1000.0)  # the SPLEEN box
    assert v["spleen_hu"] == pytest.approx(read_image[read_label > 0].mean())
    assert v["body_hu"] == pytest.approx(body_values(read_image).mean())
    # voxels only as integer-HU histograms: the body's holds the body box, no table or air voxel
    assert figures.body_hist.sum() == body_values(image).size
    assert figures.body_hist[HU_TABLE - HU_RANGE[0]] == 0 and figures.body_hist[HU_AIR - HU_RANGE[0]] == 0
    assert figures.spleen_hist.sum() == int(label.sum())


def test_the_body_is_the_largest_region_above_minus_500_hu():
    image, _ = phantom()
    image[20:24, 20:24, 4:8] = -850  # air inside the body (a lung, a bowel loop): not body
    expected = np.zeros(image.shape, dtype=bool)
    expected[BODY] = True
    expected[20:24, 20:24, 4:8] = False
    mask = body_mask(image)
    assert mask.sum() == expected.sum()
    assert (mask == expected).all()
    assert not mask[TABLE].any() and (image[TABLE] > -500).all()  # the table is above the threshold, yet left out
    assert not body_mask(np.full((8, 8, 4), -1000.0)).any()


def test_the_table_does_not_change_the_body_figures(tmp_path):
    """The table is brighter than the body: counted, it would raise the body's mean HU."""
    image, label = phantom()
    case = write_case(tmp_path, "case", image, label)
    with_table = case_figures(Path(case["image"]), Path(case["label"])).values["body_hu"]
    image[TABLE] = -1000
    no_table = write_case(tmp_path / "no_table", "case", image, label)
    assert case_figures(Path(no_table["image"]), Path(no_table["label"])).values["body_hu"] == with_table


def _stored_ira(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The RAS array stored slice-first and head-first: array axes (I, R, A), with the affine of the same scan."""
    stored = np.flip(data.transpose(2, 0, 1), axis=0)
    nz = data.shape[2]
    affine = np.array(
        [
            [0.0, SPACING[0], 0.0, ORIGIN[0]],
            [0.0, 0.0, SPACING[1], ORIGIN[1]],
            [-SPACING[2], 0.0, 0.0, ORIGIN[2] + SPACING[2] * (nz - 1)],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return stored, affine


def _stored_lps(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As the MSD files (and DICOM converters) store it: x and y flipped, a negative-diagonal affine."""
    stored = np.flip(data, axis=(0, 1))
    affine = ras_affine()
    affine[:2, :2] = np.diag([-SPACING[0], -SPACING[1]])
    affine[:2, 3] = [ORIGIN[0] + SPACING[0] * (data.shape[0] - 1), ORIGIN[1] + SPACING[1] * (data.shape[1] - 1)]
    return stored, affine


@pytest.mark.parametrize("store, codes", [(_stored_ira, ("I", "R", "A")), (_stored_lps, ("L", "P", "S"))])
def test_the_same_scan_in_another_orientation_has_the_same_figures(tmp_path, store, codes):
    image, label = phantom(seed=4)
    ras = write_case(tmp_path / "ras", "case", image, label)
    (stored_image, affine), (stored_label, _) = store(image), store(label)
    assert nib.aff2axcodes(affine) == codes
    i, j, k = 30, 15, 4  # one voxel: the same place and HU in both files (the same physical scan)
    world = ras_affine() @ [i, j, k, 1]
    index = np.rint(np.linalg.solve(affine, world)).astype(int)[:3]
    assert stored_image[tuple(index)] == image[i, j, k]
    other = {
        "image": save(tmp_path / "other" / "image.nii.gz", stored_image, affine),
        "label": save(tmp_path / "other" / "label.nii.gz", stored_label, affine),
    }
    a = case_figures(Path(ras["image"]), Path(ras["label"]))
    b = case_figures(other["image"], other["label"])
    assert b.values.keys() == a.values.keys()
    for name, value in a.values.items():
        assert b.values[name] == pytest.approx(value), name
    assert (b.body_hist == a.body_hist).all() and (b.spleen_hist == a.spleen_hist).all()
    assert (b.values["size_z"], b.values["spacing_z_mm"]) == (SHAPE[2], pytest.approx(SPACING[2]))


# ---- histograms


def test_hu_histogram_counts_every_voxel_once_per_integer_hu():
    values = np.array([-2000.0, -1024.0, -0.4, 0.4, 0.6, 39.5, 40.0, 3071.0, 3071.6, 9000.0])
    hist = hu_histogram(values)
    assert hist.size == HU_RANGE[1] - HU_RANGE[0] and hist.sum() == values.size
    at = {hu: int(hist[hu - HU_RANGE[0]]) for hu in (-1024, 0, 1, 40, 3071)}
    # outside the CT range: clipped to its ends; inside: rounded to the nearest HU (numpy rounds .5 to even)
    assert at == {-1024: 2, 0: 2, 1: 1, 40: 2, 3071: 3}


def test_intensity_histograms_honour_the_requested_bins_and_range(tmp_path):
    cases = written_cases(tmp_path)
    generator = generator_of(cases)
    images = [loaded(c["image"]) for c in cases]
    body = np.concatenate([body_values(i) for i in images])
    spleen = np.concatenate([i[loaded(c["label"]) > 0] for i, c in zip(images, cases, strict=True)])
    for feature, voxels, bins, (low, high) in (
        ("body_hu", body, 64, (-500, 1100)),
        ("spleen_hu", spleen, 4, (110, 130)),
    ):
        hist = generator.histogram(INTENSITY, feature, bins, low, high)
        assert hist.hist_type == HistogramType.STANDARD and len(hist.bins) == bins
        assert (hist.bins[0].low_value, hist.bins[-1].high_value) == (low, high)
        expected, _ = np.histogram(voxels, bins=np.linspace(low, high, bins + 1))
        assert [b.sample_count for b in hist.bins] == expected.tolist(), feature
        # every voxel within the range once (the phantoms' spleens span 105..135: cut at both ends)
        assert sum(b.sample_count for b in hist.bins) == np.count_nonzero((voxels >= low) & (voxels <= high))
    assert sum(b.sample_count for b in generator.histogram(INTENSITY, "spleen_hu", 4, 110, 130).bins) < spleen.size


def test_per_case_histograms_count_cases(tmp_path):
    generator = generator_of(written_cases(tmp_path))
    hist = generator.histogram(CASES, "size_z", 2, 10, 14)
    assert [(b.low_value, b.high_value, b.sample_count) for b in hist.bins] == [(10, 12, 1), (12, 14, 2)]
    assert sum(b.sample_count for b in generator.histogram(CASES, "spacing_z_mm", 3, 1.5, 3.5).bins) == 3


def test_minimum_and_maximum(tmp_path):
    cases = written_cases(tmp_path)
    generator = generator_of(cases)
    assert (generator.min_value(CASES, "size_z"), generator.max_value(CASES, "size_z")) == (10, 14)
    body = np.concatenate([body_values(loaded(c["image"])) for c in cases])
    # a voxel histogram's range: from its lowest HU to past its highest (the top bin holds the highest HU)
    assert generator.min_value(INTENSITY, "body_hu") == body.min()
    assert generator.max_value(INTENSITY, "body_hu") == body.max() + 1


# ---- the site's cases and its start


def job_folder(root: Path, version: str = __version__) -> Path:
    """``<root>/job/meta.json`` and ``<root>/job/app``, as NVFlare deploys a job at a site; returns the app root."""
    app = root / "job" / "app"
    app.mkdir(parents=True)
    (root / "job" / "meta.json").write_text(json.dumps({"name": "spleen_ct_statistics", JOB_VERSION_KEY: version}))
    return app


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site with 4 cases in its datalist (3 training, 1 validation), its environment set, its job deployed."""
    data = tmp_path / "data"
    cases = written_cases(data) + [write_case(data, "case_9", *phantom(9))]
    datalist = write_datalist(data / "datalists" / "site-1.json", cases[:3], cases[3:])
    monkeypatch.setenv(DATA_DIR_ENV, str(data))
    monkeypatch.setenv(DATALIST_ENV, str(data / "datalists" / "{site}.json"))
    return {"cases": cases, "datalist": datalist, "app": job_folder(tmp_path)}


def test_initialize_measures_the_datalists_cases(site, capsys):
    generator = SpleenCTStatistics()
    generator.initialize(site_context("site-1", str(site["app"])))
    assert len(generator.cases) == 4
    for name in CASE_FEATURES:
        assert (generator.count(CASES, name), generator.failure_count(CASES, name)) == (4, 0), name
    assert generator.count(INTENSITY, "spleen_hu") == 4
    assert sorted(generator.values("size_z")) == [10, 12, 12, 14]
    (line,) = tagged_lines(capsys.readouterr().out)
    assert line["kind"] == "info" and line["site"] == "site-1" and "4 cases" in line["note"]


def _truncate(case: dict) -> Path:
    path = Path(case["image"])
    path.write_bytes(path.read_bytes()[:300])
    return path


def _label_of_twos(case: dict) -> Path:
    path = Path(case["label"])
    label = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj) * 2, label.affine), str(path))
    return path


@pytest.mark.parametrize("break_case, says", [(_truncate, "not a readable NIfTI"), (_label_of_twos, "values 0, 2")])
def test_a_broken_case_stops_the_site_with_a_line_naming_the_file(site, capsys, break_case, says):
    broken = break_case(site["cases"][3])
    generator = SpleenCTStatistics()
    with pytest.raises(StatisticsDataError, match=r"site-1: 1 problem\(s\) in its cases"):
        generator.initialize(site_context("site-1", str(site["app"])))
    assert generator.cases == []
    (line,) = tagged_lines(capsys.readouterr().out)
    assert line["kind"] == "data_error" and line["site"] == "site-1"
    assert line["problem"].startswith(f"{broken}: ") and says in line["problem"]


def test_a_job_for_another_version_is_refused_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    app = job_folder(tmp_path, version="0.0.1")
    monkeypatch.setenv(DATALIST_ENV, str(tmp_path / "no_such_datalist.json"))  # reading it would fail otherwise
    generator = SpleenCTStatistics()
    with pytest.raises(StatisticsDataError, match=r"spleen_flare 0\.0\.1"):
        generator.initialize(site_context("site-2", str(app)))
    (line,) = tagged_lines(capsys.readouterr().out)
    assert line["kind"] == "install_error" and line["site"] == "site-2"
    assert f"site-2 has spleen_flare {__version__} installed, the job asks for spleen_flare 0.0.1" in line["problem"]
    assert generator.cases == []


def test_without_a_datalist_the_labelled_cases_of_dataset_json(tmp_path, monkeypatch):
    data = tmp_path / "data"
    cases = written_cases(data)
    (data / "dataset.json").write_text(
        json.dumps({"training": [{k: "./" + str(Path(c[k]).relative_to(data)) for k in c} for c in cases]})
    )
    monkeypatch.delenv(DATALIST_ENV, raising=False)
    monkeypatch.setenv(DATA_DIR_ENV, str(data))
    assert [{k: Path(v).resolve() for k, v in c.items()} for c in site_cases("site-1")] == [
        {k: Path(v).resolve() for k, v in c.items()} for c in cases
    ]
    monkeypatch.delenv(DATA_DIR_ENV)
    with pytest.raises(StatisticsDataError, match="site-1: no dataset: set SPLEEN_DATA_DIR"):
        site_cases("site-1")


# ---- the figures NVFlare asks for


def test_a_case_without_label_counts_as_a_failure_of_the_spleen_features_only(tmp_path):
    cases = written_cases(tmp_path)
    del cases[0]["label"]  # the datalist entry names no label
    empty = write_case(tmp_path, "empty", phantom(5)[0], np.zeros(SHAPE, dtype=np.uint8))  # a label without spleen
    generator = generator_of([*cases, empty])
    for name in ("spleen_volume_ml", "spleen_hu"):
        dataset = INTENSITY if name in INTENSITY_FEATURES else CASES
        assert (generator.count(dataset, name), generator.failure_count(dataset, name)) == (2, 2), name
    for name in ("size_z", "spacing_x_mm"):
        assert (generator.count(CASES, name), generator.failure_count(CASES, name)) == (4, 0), name
    assert (generator.count(INTENSITY, "body_hu"), generator.failure_count(INTENSITY, "body_hu")) == (4, 0)
    labelled = [loaded(c["label"]).sum() for c in cases[1:]]
    assert generator.sum(CASES, "spleen_volume_ml") == pytest.approx(
        sum(n * math.prod(s) / 1000 for n, (_, _, s) in zip(labelled, CASE_SPECS[1:], strict=True))
    )
    hist = generator.histogram(INTENSITY, "spleen_hu", 10, -100, 400)
    assert sum(b.sample_count for b in hist.bins) == sum(labelled)  # only the labelled cases' spleen voxels


def test_mean_spread_and_variance_agree_with_numpy(tmp_path):
    generator = generator_of(written_cases(tmp_path))
    for name in ("size_z", "spacing_z_mm", "spleen_volume_ml", "body_hu", "spleen_hu"):
        dataset = INTENSITY if name in INTENSITY_FEATURES else CASES
        values = np.array([c.values[name] for c in generator.cases])
        assert generator.count(dataset, name) == 3
        assert generator.sum(dataset, name) == pytest.approx(values.sum())
        assert generator.mean(dataset, name) == pytest.approx(values.mean())
        assert generator.stddev(dataset, name) == pytest.approx(values.std(ddof=1))
        # with its own mean and count as the global ones: the sample variance
        own = generator.variance_with_mean(dataset, name, values.mean(), 3)
        assert own == pytest.approx(values.var(ddof=1))
        # the global mean and count of all sites: this site's share of the squared deviations
        other = generator.variance_with_mean(dataset, name, values.mean() + 1.0, 10)
        assert other == pytest.approx(((values - values.mean() - 1.0) ** 2).sum() / 9)
    body_means = [body_values(loaded(c["image"])).mean() for c in written_cases(tmp_path / "again")]
    assert generator.mean(INTENSITY, "body_hu") == pytest.approx(np.mean(body_means))  # a record is a case


def test_nvflares_task_handler_sends_every_feature_the_job_asks_for(tmp_path):
    generator = generator_of(written_cases(tmp_path))
    first, second = both_tasks(generator)
    stats = {**statistics_of(first), **statistics_of(second)}
    configs = job_statistic_configs()["histogram"]
    features = {CASES: CASE_FEATURES, INTENSITY: INTENSITY_FEATURES}
    for statistic in ("count", "failure_count", "sum", "mean", "min", "max", "histogram", "stddev"):
        for dataset, names in features.items():
            assert set(stats[statistic][dataset]) == set(names), (statistic, dataset)
    assert stats["count"][CASES]["size_z"] == 3 and stats["mean"][CASES]["size_z"] == 12
    assert stats["stddev"][CASES]["size_z"] == pytest.approx(2.0)
    for dataset, names in features.items():
        for name in names:
            hist = stats[StC.STATS_HISTOGRAM][dataset][name]
            assert len(hist.bins) == configs[name]["bins"], name
            if "range" in configs[name]:  # the job's HU ranges, not the sites' extremes
                assert [hist.bins[0].low_value, hist.bins[-1].high_value] == configs[name]["range"]
            if dataset == CASES:
                assert sum(b.sample_count for b in hist.bins) == 3, name
