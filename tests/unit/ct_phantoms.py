"""Small CT phantoms written as real NIfTI files for the statistics tests: a body in air, a spleen inside it and a
bright table slab apart from it, every region known by its index, so that the tests compute the expected figures
straight from the arrays."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (48, 48, 12)  # x, y, z of the RAS array
SPACING = (0.8, 0.9, 2.5)  # mm
ORIGIN = (-20.0, -30.0, 100.0)  # mm, world position of voxel (0, 0, 0)
HU_AIR, HU_TABLE = -1000, 300
# Index boxes in the RAS array. The table lies below the body (larger y) with air between: another region.
BODY = (slice(8, 40), slice(6, 34), slice(None))
FAT = (slice(8, 40), slice(6, 8), slice(None))  # a -100 HU layer on the body's front, still above the body threshold
SPLEEN = (slice(28, 36), slice(12, 20), slice(3, 9))
TABLE = (slice(4, 44), slice(38, 42), slice(None))


def phantom(
    seed: int = 0, nz: int = SHAPE[2], spleen: bool = True, spleen_hu: int = 120
) -> tuple[np.ndarray, np.ndarray]:
    """(image in integer HU, label 0/1), both indexed x, y, z in RAS order."""
    rng = np.random.default_rng(seed)
    shape = (*SHAPE[:2], nz)
    image = np.full(shape, HU_AIR, dtype=np.int16)
    image[BODY] = 40 + rng.integers(-30, 31, size=image[BODY].shape)
    image[FAT] = -100 + rng.integers(-20, 21, size=image[FAT].shape)
    image[TABLE] = HU_TABLE
    label = np.zeros(shape, dtype=np.uint8)
    if spleen:
        image[SPLEEN] = spleen_hu + rng.integers(-15, 16, size=image[SPLEEN].shape)
        label[SPLEEN] = 1
    return image, label


def ras_affine(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = ORIGIN
    return affine


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_case(folder: Path, name: str, image: np.ndarray, label: np.ndarray | None, spacing=SPACING) -> dict[str, str]:
    """``{"image", "label"}`` of the case written in RAS orientation (no label file for ``label`` None)."""
    affine = ras_affine(spacing)
    case = {"image": str(save(folder / "imagesTr" / f"{name}.nii.gz", image, affine))}
    if label is not None:
        case["label"] = str(save(folder / "labelsTr" / f"{name}.nii.gz", label, affine))
    return case


def write_datalist(path: Path, training: list[dict], validation: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": training, "validation": validation}))
    return path
