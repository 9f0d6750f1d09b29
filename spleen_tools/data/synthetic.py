"""Small synthetic CT volumes in the exact MSD ``Task09_Spleen`` layout, for tests and smoke runs.

The volumes are made up (no patient data): an elliptic body in air, subcutaneous fat, a vertebra, a liver on
the patient's right and a smoothly deformed, brighter spleen on the patient's left, plus Gaussian noise.
A contrast ``phase`` (``"portal_venous"``, ``"non_contrast"``) sets the HU of spleen, liver and blood and adds an
aorta, a splenic and portal vein and a thin fat rim around the spleen; ``phase=None`` is the default, unchanged look
(close to portal venous, no vessels). Files are stored like the real MSD NIfTI files: a diagonal affine with
negative x and y (axis codes ``('L', 'P', 'S')``), anisotropic spacing, int16 Hounsfield units, uint8 labels.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

TASK_NAME = "Task09_Spleen"
# Marks our own output, so that make_synthetic_dataset never replaces a real download.
SYNTHETIC_DESCRIPTION = "Synthetic CT volumes made by spleen_tools.data.synthetic (no patient data), in the MSD layout"

# Hounsfield units of the tissues drawn; liver and spleen are those of the default look (phase=None).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_LIVER = 60.0
HU_BONE = 700.0
SPLEEN_HU = (100.0, 130.0)
NOISE_SD = 12.0
NOISE_SD_MAX = 100.0  # HU; real scanners are about 5-30 HU, low-dose ones noisier
SLICE_MM = (1.0, 5.0)  # slice thickness (spacing[2]) allowed, as in clinical abdominal CT


@dataclass(frozen=True)
class PhaseHU:
    """HU ranges of one contrast phase; every case draws its own value of each uniformly from them."""

    spleen: tuple[float, float]
    liver: tuple[float, float]
    aorta: tuple[float, float]
    portal_vein: tuple[float, float]


# Typical adult values. Without contrast, blood is darker than liver and spleen, and the liver is brighter than the
# spleen; in the portal venous phase (about 70 s after injection) spleen, liver and the veins enhance.
PHASES = {
    "portal_venous": PhaseHU(
        spleen=(120.0, 160.0), liver=(100.0, 120.0), aorta=(150.0, 180.0), portal_vein=(150.0, 180.0)
    ),
    "non_contrast": PhaseHU(spleen=(40.0, 50.0), liver=(55.0, 65.0), aorta=(35.0, 45.0), portal_vein=(35.0, 45.0)),
}


def _case_ids(num_train: int, num_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Non-contiguous case numbers like MSD's (spleen_2, spleen_3, spleen_6, ...), deterministic for a seed."""
    total = num_train + num_test
    rng = np.random.default_rng([seed, 0])
    ids = sorted(int(i) for i in rng.choice(np.arange(1, 2 * total + 1), size=total, replace=False))
    test = sorted(int(i) for i in rng.choice(ids, size=num_test, replace=False)) if num_test else []
    train = [i for i in ids if i not in set(test)]
    return train, test


def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Diagonal LPS-stored affine as in MSD files (x and y negative), centred on the volume."""
    sx, sy, sz = spacing
    nx, ny, nz = shape
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [(nx - 1) / 2 * sx, (ny - 1) / 2 * sy, -(nz - 1) / 2 * sz]
    return affine


@dataclass
class _Anatomy:
    """Masks of one case and the sizes the vessels are placed by (mm from the centre, +x = patient's left,
    +y = posterior, +z = superior)."""

    body: np.ndarray
    inner: np.ndarray
    spine: np.ndarray
    liver: np.ndarray
    spleen: np.ndarray
    rim: np.ndarray  # a thin shell around the spleen (perisplenic fat), drawn only with a phase
    a: float  # the body's half axes
    b: float
    spleen_centre: tuple[float, float, float]


def _draw_anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> _Anatomy:
    """Body, vertebra, liver and spleen masks; the random draws come in the order the default look has always used."""
    nx, ny, nz = shape
    sx, sy, sz = spacing
    x = ((np.arange(nx) - (nx - 1) / 2) * sx)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * sy)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2) * sz)[None, None, :]
    half_x, half_y, half_z = nx * sx / 2, ny * sy / 2, max(nz * sz / 2, sz)

    # Body: an ellipse wider left-right than front-back, the same on every slice.
    a, b = half_x * rng.uniform(0.86, 0.94), half_y * rng.uniform(0.7, 0.8)
    body_r = (x / a) ** 2 + (y / b) ** 2
    body = np.broadcast_to(body_r <= 1.0, shape)
    inner = np.broadcast_to(body_r <= rng.uniform(0.72, 0.8), shape)
    # Vertebra: a disc at the posterior midline.
    spine = np.broadcast_to((x**2 + (y - 0.62 * b) ** 2) <= (b * 0.16) ** 2, shape)
    # Liver: a large ellipsoid on the patient's right (x < 0).
    liver = ((x + 0.35 * a) / (0.4 * a)) ** 2 + ((y + 0.05 * b) / (0.55 * b)) ** 2 + (
        (z - 0.2 * half_z) / (1.1 * half_z)
    ) ** 2 <= 1.0

    # Spleen: a smoothly deformed, rotated ellipsoid in the left upper abdomen, size and place vary per case.
    cx, cy, cz = a * rng.uniform(0.45, 0.58), b * rng.uniform(0.1, 0.3), half_z * rng.uniform(-0.2, 0.3)
    rx, ry, rz = a * rng.uniform(0.14, 0.2), b * rng.uniform(0.3, 0.42), half_z * rng.uniform(0.45, 0.7)
    theta = rng.uniform(-0.6, -0.2)  # long axis tilted along the ribs
    u0, v0 = x - cx, y - cy
    u = (np.cos(theta) * u0 + np.sin(theta) * v0) / rx
    v = (-np.sin(theta) * u0 + np.cos(theta) * v0) / ry
    w = (z - cz) / rz
    wave = rng.uniform(0, 2 * np.pi, size=3)
    bump = 1.0 + 0.12 * np.sin(2.5 * u + wave[0]) * np.cos(2.0 * v + wave[1]) + 0.08 * np.sin(3.0 * w + wave[2])
    r2 = u**2 + v**2 + w**2
    spleen = (r2 <= bump**2) & inner
    rim = (r2 <= (1.25 * bump) ** 2) & inner & ~spleen & ~liver & ~spine
    return _Anatomy(body, inner, spine, liver & inner, spleen, rim, a, b, (cx, cy, cz))


def _disc_or_tube(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    p0: tuple[float, float],
    p1: tuple[float, float],
    radius: float,
    z_range: tuple[float, float],
) -> np.ndarray:
    """Voxels within ``radius`` mm of the axial segment p0-p1 (x, y in mm; p0 == p1: a disc) and within z_range."""
    nx, ny, nz = shape
    sx, sy, sz = spacing
    x = ((np.arange(nx) - (nx - 1) / 2) * sx)[:, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * sy)[None, :]
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length2 = dx * dx + dy * dy
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / length2, 0.0, 1.0) if length2 else 0.0
    near = (x - p0[0] - t * dx) ** 2 + (y - p0[1] - t * dy) ** 2 <= radius**2
    in_z = (z >= z_range[0]) & (z <= z_range[1])
    return near[:, :, None] & in_z[None, None, :]


def _vessels(anatomy: _Anatomy, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple:
    """The aorta (a tube along z, anterior-left of the vertebra) and the splenic + portal vein (from the spleen's
    centre to the confluence in front of the aorta, then into the liver, in the spleen's mid-axial plane)."""
    a, b = anatomy.a, anatomy.b
    cx, cy, cz = anatomy.spleen_centre
    aorta = _disc_or_tube(shape, spacing, (0.08 * a, 0.34 * b), (0.08 * a, 0.34 * b), 0.1 * b, (-math.inf, math.inf))
    radius = max(0.05 * b, 1.5 * min(spacing[:2]))  # at least a few voxels wide on small phantoms
    half_height = max(radius, 0.6 * spacing[2])  # at least one slice
    z_range = (cz - half_height, cz + half_height)
    confluence = (0.0, 0.12 * b)
    vein = _disc_or_tube(shape, spacing, (cx, cy), confluence, radius, z_range)
    vein |= _disc_or_tube(shape, spacing, confluence, (-0.3 * a, 0.0), radius, z_range)
    inside = anatomy.inner & ~anatomy.spine
    return aorta & inside, vein & inside & ~aorta


def _draw_phase(
    rng: np.random.Generator, img: np.ndarray, anatomy: _Anatomy, hu: PhaseHU, spacing: tuple[float, float, float]
) -> None:
    """Liver, perisplenic fat and vessels of a contrast phase into ``img``. Their HU are drawn after the noise, so
    one seed gives the same anatomy and noise in every phase."""
    liver_hu, aorta_hu, vein_hu = (rng.uniform(*r) for r in (hu.liver, hu.aorta, hu.portal_vein))
    aorta, vein = _vessels(anatomy, img.shape, spacing)
    img[anatomy.liver] = liver_hu
    img[anatomy.rim] = HU_FAT
    img[aorta] = aorta_hu
    img[vein] = vein_hu


def _make_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    with_label: bool,
    intensity_offset: float = 0.0,
    phase: str | None = None,
    noise_sd: float = NOISE_SD,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one volume (int16 HU) and its spleen label (uint8), array axes = (left, posterior, superior).

    ``intensity_offset`` (HU) is added to every voxel before the noise, like a scanner's calibration offset.
    ``phase`` (a key of PHASES) draws that phase's HU and the vessels; None keeps the default look.
    """
    anatomy = _draw_anatomy(rng, shape, spacing)
    hu = PHASES[phase] if phase is not None else None
    spleen_hu = rng.uniform(*(hu.spleen if hu else SPLEEN_HU))
    noise = rng.normal(0.0, noise_sd, size=shape).astype(np.float32)

    img = np.full(shape, HU_AIR, dtype=np.float32)
    img[anatomy.body] = HU_FAT
    img[anatomy.inner] = HU_SOFT
    img[anatomy.spine] = HU_BONE
    img[anatomy.liver] = HU_LIVER
    if hu is not None:
        _draw_phase(rng, img, anatomy, hu, spacing)
    img[anatomy.spleen] = spleen_hu

    if intensity_offset:
        img += np.float32(intensity_offset)
    img += noise
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    label = anatomy.spleen.astype(np.uint8) if with_label else np.zeros(shape, dtype=np.uint8)
    return image, label


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write NIfTI with explicit dtype and codes; nibabel gzips with mtime 0, so bytes are reproducible."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _dataset_json(train: list[int], test: list[int], extra: dict | None = None) -> dict:
    """dataset.json with the same keys as MSD Task09_Spleen's, plus ``extra`` (how non-default data was made)."""
    return {
        "name": "Spleen",
        "description": SYNTHETIC_DESCRIPTION,
        # Licence string as in MSD so tools see the usual keys; the volumes are our own synthetic data.
        "reference": "Synthetic volumes made by this project (spleen_tools), not derived from MSD images",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": len(train),
        "numTest": len(test),
        "training": [
            {"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in train
        ],
        "test": [f"./imagesTs/spleen_{i}.nii.gz" for i in test],
        **(extra or {}),
    }


def _is_synthetic(task_dir: Path) -> bool:
    try:
        meta = json.loads((task_dir / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("description") == SYNTHETIC_DESCRIPTION


def _check_args(
    num_train: int,
    num_test: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    intensity_offset: float,
    phase: str | None,
    noise_sd: float,
) -> None:
    """One ValueError naming the parameter and what it allows."""
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes >= 4, got {shape}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive millimetre values, got {spacing}")
    if not SLICE_MM[0] <= spacing[2] <= SLICE_MM[1]:
        raise ValueError(
            f"spacing[2] (slice thickness) must be between {SLICE_MM[0]:g} and {SLICE_MM[1]:g} mm, got {spacing[2]}"
        )
    if not np.isfinite(intensity_offset) or abs(intensity_offset) > 1000:
        raise ValueError(f"intensity_offset must be a finite HU value within +-1000, got {intensity_offset}")
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase must be None or one of {', '.join(PHASES)}, got {phase!r}")
    if not (math.isfinite(noise_sd) and 0 <= noise_sd <= NOISE_SD_MAX):
        raise ValueError(f"noise_sd must be a HU standard deviation between 0 and {NOISE_SD_MAX:g}, got {noise_sd}")


def _extra_keys(phase: str | None, noise_sd: float) -> dict:
    """dataset.json keys beyond MSD's, only for non-default data (the default dataset.json stays as it was)."""
    extra: dict = {"contrast_phase": phase} if phase is not None else {}
    if noise_sd != NOISE_SD:
        extra["noise_sd"] = noise_sd
    return extra


def make_synthetic_dataset(
    out_dir: str | Path,
    num_train: int = 12,
    num_test: int = 2,
    shape: tuple[int, int, int] = (96, 96, 24),
    spacing: tuple[float, float, float] = (0.8, 0.8, 5.0),
    seed: int = 0,
    intensity_offset: float = 0.0,
    phase: str | None = None,
    noise_sd: float = NOISE_SD,
) -> Path:
    """Write ``<out_dir>/Task09_Spleen`` (dataset.json, imagesTr, labelsTr, imagesTs) and return its path.

    Deterministic for a seed (same bytes). Slice counts vary by up to +-4 around ``shape[2]`` like real scans;
    ``spacing[2]`` is the slice thickness (1-5 mm). ``intensity_offset`` adds that many HU to every voxel (a site's
    calibration offset); labels are unchanged. ``phase`` (``"portal_venous"``, ``"non_contrast"``) draws that
    contrast phase's HU and the vessels, and is written to dataset.json as ``contrast_phase``; None is the default,
    unchanged look (close to portal venous). ``noise_sd`` is the scanner noise in HU. For one seed, the labels are
    the same whatever the phase, offset or noise.
    An existing synthetic dataset at that place is replaced; anything else there raises FileExistsError.
    """
    _check_args(num_train, num_test, shape, spacing, intensity_offset, phase, noise_sd)
    out_dir = Path(out_dir)
    task_dir = out_dir / TASK_NAME
    if task_dir.exists() and not _is_synthetic(task_dir):
        raise FileExistsError(f"{task_dir} exists and is not synthetic; choose another folder or remove it")
    out_dir.mkdir(parents=True, exist_ok=True)

    train, test = _case_ids(num_train, num_test, seed)
    dz = min(4, shape[2] // 4)
    # Build in a temporary sibling and rename at the end: a half-written dataset never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{TASK_NAME}.tmp-", dir=out_dir))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        for case_id in train + test:
            rng = np.random.default_rng([seed, 1, case_id])  # one stream per case: order-independent
            case_shape = (shape[0], shape[1], shape[2] + int(rng.integers(-dz, dz + 1)))
            image, label = _make_case(rng, case_shape, spacing, case_id in train, intensity_offset, phase, noise_sd)
            affine = _affine(case_shape, spacing)
            name = f"spleen_{case_id}.nii.gz"
            if case_id in train:
                _save(image, affine, tmp / "imagesTr" / name)
                _save(label, affine, tmp / "labelsTr" / name)
            else:
                _save(image, affine, tmp / "imagesTs" / name)
        (tmp / "dataset.json").write_text(
            json.dumps(_dataset_json(train, test, _extra_keys(phase, noise_sd)), indent=4) + "\n"
        )
        if task_dir.exists():
            shutil.rmtree(task_dir)
        tmp.rename(task_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return task_dir
