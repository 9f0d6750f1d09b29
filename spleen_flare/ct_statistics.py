"""A site's CT statistics for NVFlare's federated statistics workflow: how its scans look, no voxel leaving.

NVFlare asks the site's ``Statistics`` for counts, sums, spreads and histograms of named features; the site's
privacy filter (``spleen_flare.stats_privacy``) then removes what its thresholds forbid. Two datasets (NVFlare's
word for a group of features), both with one record per case, so that NVFlare's minimum count is a number of cases:

- ``cases``: voxel spacing (mm) and size (voxels) along x, y, z of the scan turned to RAS (x right-left, y
  anterior-posterior, z head-foot: z is the slice direction of an axial scan, whatever the file's orientation), and
  the spleen volume (mL, from the label).
- ``intensity``: Hounsfield units inside the body and inside the spleen label. A record is a case: its value (for
  count, sum, mean and spread) is the case's mean HU; its histogram counts the case's voxels. The body is the
  largest connected region above ``BODY_HU`` (the patient, not the table or air).

Everything is computed once, when the job starts at the site, after the site's own data check (the same rules as
training: a file that declares a memory bomb is refused before it is read). Voxels are kept only as integer-HU
histograms (one bin per HU over the CT range), from which any bins NVFlare asks for are summed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.statistics_spec import Bin, DataType, Feature, Histogram, HistogramType, Statistics
from scipy import ndimage

from spleen_flare.contract import PROGRESS_TAG, tagged_line
from spleen_flare.data_check import SiteDataError, check_site_cases
from spleen_flare.site_data import site_data
from spleen_flare.site_install import version_problem

CASES, INTENSITY = "cases", "intensity"  # NVFlare's dataset names in stats.json
CASE_FEATURES = ("spacing_x_mm", "spacing_y_mm", "spacing_z_mm", "size_x", "size_y", "size_z", "spleen_volume_ml")
INTENSITY_FEATURES = ("body_hu", "spleen_hu")
HU_RANGE = (-1024, 3072)  # the CT range; values outside are padding outside the field of view, clipped
BODY_HU = -500.0  # above it: tissue, not air or lung


class StatisticsDataError(SiteDataError):
    """The site's cases cannot be read for statistics; its ``data_error`` lines say which file and why."""


def progress(**fields) -> None:
    print(tagged_line(PROGRESS_TAG, **fields), flush=True)


@dataclass
class CaseFigures:
    """One case: its per-case values (None where it has no spleen label) and its voxel histograms per HU."""

    values: dict[str, float | None]
    body_hist: np.ndarray
    spleen_hist: np.ndarray | None


def hu_histogram(values: np.ndarray) -> np.ndarray:
    """Counts per integer HU over ``HU_RANGE`` (values rounded, clipped into the range)."""
    low, high = HU_RANGE
    index = np.clip(np.rint(values), low, high - 1).astype(np.int64) - low
    return np.bincount(index, minlength=high - low)


def _mean_of(hist: np.ndarray) -> float | None:
    total = int(hist.sum())
    return float(hist @ np.arange(*HU_RANGE)) / total if total else None


def body_mask(image: np.ndarray) -> np.ndarray:
    """The largest connected region above ``BODY_HU``."""
    regions, count = ndimage.label(image > BODY_HU)
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return regions == int(np.argmax(sizes))


def case_figures(image_path: Path, label_path: Path | None) -> CaseFigures:
    """Read one checked case (RAS orientation) and measure it."""
    image = nib.as_closest_canonical(nib.load(str(image_path)))
    spacing = [float(z) for z in image.header.get_zooms()[:3]]
    data = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])
    values: dict[str, float | None] = {f"spacing_{a}_mm": s for a, s in zip("xyz", spacing, strict=True)}
    values.update({f"size_{a}": float(n) for a, n in zip("xyz", data.shape, strict=True)})
    body_hist = hu_histogram(data[body_mask(data)])
    spleen_hist, volume = None, None
    if label_path is not None:
        label = nib.as_closest_canonical(nib.load(str(label_path)))
        spleen = np.asarray(label.dataobj).reshape(label.shape[:3]) > 0
        if spleen.any():
            spleen_hist = hu_histogram(data[spleen])
            volume = float(spleen.sum()) * math.prod(spacing) / 1000.0
    values["spleen_volume_ml"] = volume
    values["body_hu"] = _mean_of(body_hist)
    values["spleen_hu"] = _mean_of(spleen_hist) if spleen_hist is not None else None
    return CaseFigures(values, body_hist, spleen_hist)


def site_cases(site: str) -> list[dict]:
    """The site's cases as its environment names them: its datalist (training and validation), else the labelled
    cases of its dataset folder's dataset.json."""
    data = site_data(site)
    lists = data.lists()
    if lists is not None:
        return lists[0] + lists[1]
    if not data.data_dir:
        raise StatisticsDataError(f"{site}: no dataset: set SPLEEN_DATA_DIR (and SPLEEN_DATALIST) for the site")
    root = Path(data.data_dir)
    meta = json.loads((root / "dataset.json").read_text())
    return [{k: str(root / c[k]) for k in ("image", "label")} for c in meta.get("training", [])]


class SpleenCTStatistics(Statistics):
    """NVFlare ``Statistics`` over this site's CT cases (see the module's docstring for the features)."""

    def __init__(self) -> None:
        super().__init__()
        self.cases: list[CaseFigures] = []

    def initialize(self, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        problem = version_problem(Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)), site)
        if problem:  # the job names another job side than this site installed
            progress(kind="install_error", site=site, problem=problem)
            raise StatisticsDataError(problem)
        cases = site_cases(site)
        check_site_cases(site, cases, error=StatisticsDataError)
        self.cases = [case_figures(Path(c["image"]), Path(c["label"]) if c.get("label") else None) for c in cases]
        progress(kind="info", site=site, note=f"statistics of {len(self.cases)} cases ready")

    def features(self) -> dict[str, list[Feature]]:
        return {
            CASES: [Feature(name, DataType.FLOAT) for name in CASE_FEATURES],
            INTENSITY: [Feature(name, DataType.FLOAT) for name in INTENSITY_FEATURES],
        }

    def values(self, feature: str) -> np.ndarray:
        found = [c.values[feature] for c in self.cases]
        return np.array([v for v in found if v is not None], dtype=np.float64)

    def count(self, dataset_name: str, feature_name: str) -> int:
        return int(self.values(feature_name).size)

    def failure_count(self, dataset_name: str, feature_name: str) -> int:
        return len(self.cases) - self.count(dataset_name, feature_name)

    def sum(self, dataset_name: str, feature_name: str) -> float:
        return float(self.values(feature_name).sum())

    def mean(self, dataset_name: str, feature_name: str) -> float:
        values = self.values(feature_name)
        return float(values.mean()) if values.size else 0.0

    def stddev(self, dataset_name: str, feature_name: str) -> float:
        values = self.values(feature_name)
        return float(values.std(ddof=1)) if values.size > 1 else 0.0

    def variance_with_mean(
        self, dataset_name: str, feature_name: str, global_mean: float, global_count: float
    ) -> float:
        values = self.values(feature_name)
        return float(((values - global_mean) ** 2).sum() / (global_count - 1)) if global_count > 1 else 0.0

    def voxel_histogram(self, feature_name: str) -> np.ndarray:
        """The site's voxel counts per HU for an intensity feature."""
        hists = [c.body_hist if feature_name == "body_hu" else c.spleen_hist for c in self.cases]
        hists = [h for h in hists if h is not None]
        return np.sum(hists, axis=0) if hists else np.zeros(HU_RANGE[1] - HU_RANGE[0], dtype=np.int64)

    def _extremes(self, feature_name: str) -> tuple[float, float]:
        if feature_name in INTENSITY_FEATURES:
            present = np.flatnonzero(self.voxel_histogram(feature_name)) + HU_RANGE[0]
            return (float(present[0]), float(present[-1]) + 1.0) if present.size else (0.0, 0.0)
        values = self.values(feature_name)
        return (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)

    def min_value(self, dataset_name: str, feature_name: str) -> float:
        return self._extremes(feature_name)[0]

    def max_value(self, dataset_name: str, feature_name: str) -> float:
        return self._extremes(feature_name)[1]

    def histogram(
        self, dataset_name: str, feature_name: str, num_of_bins: int, global_min_value: float, global_max_value: float
    ) -> Histogram:
        edges = np.linspace(global_min_value, global_max_value, num_of_bins + 1)
        if feature_name in INTENSITY_FEATURES:  # each integer HU's count into the bin holding that HU
            counts, _ = np.histogram(np.arange(*HU_RANGE), bins=edges, weights=self.voxel_histogram(feature_name))
        else:
            counts, _ = np.histogram(self.values(feature_name), bins=edges)
        bins = [Bin(float(lo), float(hi), float(n)) for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True)]
        return Histogram(HistogramType.STANDARD, bins)
