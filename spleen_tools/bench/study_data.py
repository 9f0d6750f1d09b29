"""The study's data: per-site datalists and a held-out set, IID (one dataset split), non-IID (one style per site)
or phase (one contrast phase per site).

Datalists hold absolute paths: the bundle loads the listed files as they are (``dataset_dir`` only feeds the
bundle's own glob, which a datalist replaces), so non-IID sites keep one dataset folder each. Held-out cases come
from datasets made with other seeds: no site trains or validates on them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from spleen_tools.data import make_site_datalists, make_synthetic_dataset, split_cases

Case = dict[str, str]
HELD_OUT_SEED = 1000  # held-out datasets use seed + this (+ site index): cases no site has
IID_SHAPE = (96, 96, 24)
IID_SPACING = (0.8, 0.8, 5.0)
TINY_SHAPE = (64, 64, 16)


@dataclass(frozen=True)
class SiteStyle:
    """How one hospital's scans look: calibration offset, slice spacing, field of view, case count and contrast
    phase (None: the generator's default look)."""

    intensity_offset: float
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    cases: int
    phase: str | None = None


# The two ends of the non-IID range; sites in between are interpolated (site-1 = FIRST, site-N = LAST).
STYLE_FIRST = SiteStyle(intensity_offset=0.0, spacing=(0.8, 0.8, 5.0), shape=(96, 96, 24), cases=12)
STYLE_LAST = SiteStyle(intensity_offset=60.0, spacing=(0.8, 0.8, 3.0), shape=(112, 112, 32), cases=8)
TINY_STYLE_FIRST = SiteStyle(intensity_offset=0.0, spacing=(0.8, 0.8, 5.0), shape=(64, 64, 16), cases=3)
TINY_STYLE_LAST = SiteStyle(intensity_offset=60.0, spacing=(0.8, 0.8, 3.0), shape=(72, 72, 24), cases=3)
# The phase setting: site-1 scans without contrast, every other site in the portal venous phase.
FIRST_SITE_PHASE, OTHER_SITES_PHASE = "non_contrast", "portal_venous"


@dataclass
class StudyData:
    """Sites' (training, validation) lists, the held-out list, and where the simulator finds the datalists."""

    setting: str
    root: Path  # the simulator's data folder; datalists under root/datalists/<site>.json
    sites: dict[str, tuple[list[Case], list[Case]]]
    held_out: list[Case]
    styles: dict[str, dict] = field(default_factory=dict)

    @property
    def datalist_dir(self) -> Path:
        return self.root / "datalists"

    @property
    def site_names(self) -> list[str]:
        return list(self.sites)

    def all_training(self) -> list[Case]:
        return [case for training, _ in self.sites.values() for case in training]

    def all_validation(self) -> list[Case]:
        return [case for _, validation in self.sites.values() for case in validation]

    def describe(self) -> dict:
        return {
            "root": str(self.root),
            "sites": {
                site: {"training": len(tr), "validation": len(va), "style": self.styles.get(site)}
                for site, (tr, va) in self.sites.items()
            },
            "held_out": len(self.held_out),
            "held_out_styles": self.styles.get("held_out"),
        }


def read_cases(task_dir: Path) -> list[Case]:
    """The labelled cases of an MSD dataset.json, absolute paths, sorted by image path."""
    meta = json.loads((task_dir / "dataset.json").read_text())
    cases = [{k: str((task_dir / c[k]).resolve()) for k in ("image", "label")} for c in meta["training"]]
    return sorted(cases, key=lambda c: c["image"])


def write_datalist(path: Path, training: list[Case], validation: list[Case]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": training, "validation": validation}, indent=2) + "\n")
    return path


def site_styles(num_sites: int, tiny: bool = False) -> list[SiteStyle]:
    """One style per site, evenly from the first style to the last (offset, slice spacing, shape, cases)."""
    first, last = (TINY_STYLE_FIRST, TINY_STYLE_LAST) if tiny else (STYLE_FIRST, STYLE_LAST)
    styles = []
    for i in range(num_sites):
        t = i / (num_sites - 1) if num_sites > 1 else 0.0

        def lerp(a: float, b: float, t: float = t) -> float:
            return a + (b - a) * t

        styles.append(
            SiteStyle(
                intensity_offset=round(lerp(first.intensity_offset, last.intensity_offset), 1),
                spacing=tuple(round(lerp(a, b), 2) for a, b in zip(first.spacing, last.spacing, strict=True)),
                shape=tuple(round(lerp(a, b)) for a, b in zip(first.shape, last.shape, strict=True)),
                cases=round(lerp(first.cases, last.cases)),
            )
        )
    return styles


def make_iid_data(root: Path, num_sites: int, seed: int = 0, tiny: bool = False) -> StudyData:
    """One dataset split per site by ``make_site_datalists`` (default rule), plus held-out cases of its kind."""
    root = Path(root).resolve()
    shape = TINY_SHAPE if tiny else IID_SHAPE
    per_site, held = (3, 2) if tiny else (8, 4)
    task = make_synthetic_dataset(
        root / "sites", num_train=per_site * num_sites, num_test=0, shape=shape, spacing=IID_SPACING, seed=seed
    )
    paths = make_site_datalists(task, num_sites, out_dir=root / "datalists")
    sites = {}
    for site, path in paths.items():
        lists = json.loads(path.read_text())
        sites[site] = (lists["training"], lists["validation"])
    held_task = make_synthetic_dataset(
        root / "held_out", num_train=held, num_test=0, shape=shape, spacing=IID_SPACING, seed=seed + HELD_OUT_SEED
    )
    style = asdict(SiteStyle(0.0, IID_SPACING, shape, per_site * num_sites))
    return StudyData("iid", root, sites, read_cases(held_task), {"all": style, "held_out": {"all": style}})


def phase_styles(num_sites: int, tiny: bool = False) -> list[SiteStyle]:
    """The non-IID styles without their calibration offset, site-1 non-contrast and the others portal venous."""
    return [
        replace(style, intensity_offset=0.0, phase=FIRST_SITE_PHASE if i == 0 else OTHER_SITES_PHASE)
        for i, style in enumerate(site_styles(num_sites, tiny))
    ]


def make_styled_data(setting: str, root: Path, styles: list[SiteStyle], seed: int = 0, tiny: bool = False) -> StudyData:
    """One dataset folder per site style; each site's cases split into training/validation by the default rule;
    held-out: a few cases of every style, from other seeds."""
    root = Path(root).resolve()
    held_per_style = 1 if tiny else 2
    sites: dict[str, tuple[list[Case], list[Case]]] = {}
    held_out: list[Case] = []
    described: dict[str, dict] = {}
    held: dict[str, str] = {}
    for i, style in enumerate(styles, start=1):
        site = f"site-{i}"
        kwargs = {
            "shape": style.shape,
            "spacing": style.spacing,
            "intensity_offset": style.intensity_offset,
            "phase": style.phase,
        }
        task = make_synthetic_dataset(root / site, num_train=style.cases, num_test=0, seed=seed + i, **kwargs)
        ((training, validation),) = split_cases(read_cases(task), 1, seed=seed)
        write_datalist(root / "datalists" / f"{site}.json", training, validation)
        sites[site] = (training, validation)
        described[site] = {k: v for k, v in asdict(style).items() if v is not None}  # no phase: the default look
        held_task = make_synthetic_dataset(
            root / "held_out" / site, num_train=held_per_style, num_test=0, seed=seed + HELD_OUT_SEED + i, **kwargs
        )
        held_out += read_cases(held_task)
        held[site] = f"{held_per_style} cases of {site}'s style" + (f" ({style.phase})" if style.phase else "")
    described["held_out"] = held
    return StudyData(setting, root, sites, held_out, described)


def make_noniid_data(root: Path, num_sites: int, seed: int = 0, tiny: bool = False) -> StudyData:
    """Sites differ in calibration offset, slice spacing, field of view and case count (``site_styles``)."""
    return make_styled_data("noniid", root, site_styles(num_sites, tiny), seed, tiny)


def make_phase_data(root: Path, num_sites: int, seed: int = 0, tiny: bool = False) -> StudyData:
    """Sites differ in contrast phase: site-1 has non-contrast scans only, every other site portal venous ones only.
    Slice spacing, field of view and case count are the non-IID setting's; no calibration offset (0 HU), so the
    phase is the one difference in intensity. Held-out: a few cases of every site's style, so of both phases."""
    return make_styled_data("phase", root, phase_styles(num_sites, tiny), seed, tiny)


def make_study_data(setting: str, root: Path, num_sites: int, seed: int = 0, tiny: bool = False) -> StudyData:
    if setting == "iid":
        return make_iid_data(root, num_sites, seed, tiny)
    if setting == "noniid":
        return make_noniid_data(root, num_sites, seed, tiny)
    if setting == "phase":
        return make_phase_data(root, num_sites, seed, tiny)
    raise ValueError(f"unknown data setting {setting!r}")
