"""Small synthetic CT volumes in the exact MSD ``Task09_Spleen`` layout, for tests and smoke runs.

The volumes are made up (no patient data): an elliptic body in air, subcutaneous fat, a vertebra, a liver on
the patient's right and a smoothly deformed, brighter spleen on the patient's left, plus Gaussian noise.
Files are stored like the real MSD NIfTI files: a diagonal affine with negative x and y (axis codes
``('L', 'P', 'S')``), anisotropic spacing, int16 Hounsfield units, uint8 labels.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

TASK_NAME = "Task09_Spleen"
# Marks our own output, so that make_synthetic_dataset never replaces a real download.
SYNTHETIC_DESCRIPTION = "Synthetic CT volumes made by spleen_tools.data.synthetic (no patient data), in the MSD layout"

# Hounsfield units of the tissues drawn.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_LIVER = 60.0
HU_BONE = 700.0
NOISE_SD = 12.0


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


def _make_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    with_label: bool,
    intensity_offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one volume (int16 HU) and its spleen label (uint8), array axes = (left, posterior, superior).

    ``intensity_offset`` (HU) is added to every voxel before the noise, like a scanner's calibration offset.
    """
    nx, ny, nz = shape
    sx, sy, sz = spacing
    # Millimetres from the centre; +x = patient's left, +y = posterior, +z = superior (LPS storage order).
    x = ((np.arange(nx) - (nx - 1) / 2) * sx)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * sy)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2) * sz)[None, None, :]
    half_x, half_y, half_z = nx * sx / 2, ny * sy / 2, max(nz * sz / 2, sz)

    # Body: an ellipse wider left-right than front-back, the same on every slice.
    a, b = half_x * rng.uniform(0.86, 0.94), half_y * rng.uniform(0.7, 0.8)
    body_r = (x / a) ** 2 + (y / b) ** 2
    img = np.full(shape, HU_AIR, dtype=np.float32)
    img[np.broadcast_to(body_r <= 1.0, shape)] = HU_FAT
    inner = np.broadcast_to(body_r <= rng.uniform(0.72, 0.8), shape)
    img[inner] = HU_SOFT

    # Vertebra: a bright disc at the posterior midline.
    spine_r = b * 0.16
    spine = (x**2 + (y - 0.62 * b) ** 2) <= spine_r**2
    img[np.broadcast_to(spine, shape)] = HU_BONE

    # Liver: a large ellipsoid on the patient's right (x < 0), slightly darker than the spleen.
    liver = ((x + 0.35 * a) / (0.4 * a)) ** 2 + ((y + 0.05 * b) / (0.55 * b)) ** 2 + (
        (z - 0.2 * half_z) / (1.1 * half_z)
    ) ** 2 <= 1.0
    img[liver & inner] = HU_LIVER

    # Spleen: a smoothly deformed, rotated ellipsoid in the left upper abdomen, size and place vary per case.
    cx = a * rng.uniform(0.45, 0.58)
    cy = b * rng.uniform(0.1, 0.3)
    cz = half_z * rng.uniform(-0.2, 0.3)
    rx, ry, rz = a * rng.uniform(0.14, 0.2), b * rng.uniform(0.3, 0.42), half_z * rng.uniform(0.45, 0.7)
    theta = rng.uniform(-0.6, -0.2)  # long axis tilted along the ribs
    u0, v0 = x - cx, y - cy
    u = (np.cos(theta) * u0 + np.sin(theta) * v0) / rx
    v = (-np.sin(theta) * u0 + np.cos(theta) * v0) / ry
    w = (z - cz) / rz
    phase = rng.uniform(0, 2 * np.pi, size=3)
    bump = 1.0 + 0.12 * np.sin(2.5 * u + phase[0]) * np.cos(2.0 * v + phase[1]) + 0.08 * np.sin(3.0 * w + phase[2])
    spleen = (u**2 + v**2 + w**2 <= bump**2) & inner
    img[spleen] = rng.uniform(100.0, 130.0)

    if intensity_offset:
        img += np.float32(intensity_offset)
    img += rng.normal(0.0, NOISE_SD, size=shape).astype(np.float32)
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    label = spleen.astype(np.uint8) if with_label else np.zeros(shape, dtype=np.uint8)
    return image, label


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write NIfTI with explicit dtype and codes; nibabel gzips with mtime 0, so bytes are reproducible."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _dataset_json(train: list[int], test: list[int]) -> dict:
    """dataset.json with the same keys as MSD Task09_Spleen's."""
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
    }


def _is_synthetic(task_dir: Path) -> bool:
    try:
        meta = json.loads((task_dir / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("description") == SYNTHETIC_DESCRIPTION


def make_synthetic_dataset(
    out_dir: str | Path,
    num_train: int = 12,
    num_test: int = 2,
    shape: tuple[int, int, int] = (96, 96, 24),
    spacing: tuple[float, float, float] = (0.8, 0.8, 5.0),
    seed: int = 0,
    intensity_offset: float = 0.0,
) -> Path:
    """Write ``<out_dir>/Task09_Spleen`` (dataset.json, imagesTr, labelsTr, imagesTs) and return its path.

    Deterministic for a seed (same bytes). Slice counts vary by up to +-4 around ``shape[2]`` like real scans.
    ``intensity_offset`` adds that many HU to every voxel (a site's calibration offset); labels are unchanged.
    An existing synthetic dataset at that place is replaced; anything else there raises FileExistsError.
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes >= 4, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive millimetre values, got {spacing}")
    if not np.isfinite(intensity_offset) or abs(intensity_offset) > 1000:
        raise ValueError(f"intensity_offset must be a finite HU value within +-1000, got {intensity_offset}")
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
            image, label = _make_case(rng, case_shape, spacing, case_id in train, intensity_offset)
            affine = _affine(case_shape, spacing)
            name = f"spleen_{case_id}.nii.gz"
            if case_id in train:
                _save(image, affine, tmp / "imagesTr" / name)
                _save(label, affine, tmp / "labelsTr" / name)
            else:
                _save(image, affine, tmp / "imagesTs" / name)
        (tmp / "dataset.json").write_text(json.dumps(_dataset_json(train, test), indent=4) + "\n")
        if task_dir.exists():
            shutil.rmtree(task_dir)
        tmp.rename(task_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return task_dir
