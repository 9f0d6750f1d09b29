"""What a mask says: spleen volume, agreement with a label, and that it lies exactly on its scan."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_flare.data_check import grid_problem


def voxel_volume_ml(image: nib.Nifti1Image) -> float:
    return float(abs(np.linalg.det(image.affine[:3, :3]))) / 1000.0


def spleen_volume_ml(mask: nib.Nifti1Image) -> float:
    return float(np.count_nonzero(np.asanyarray(mask.dataobj) > 0)) * voxel_volume_ml(mask)


def dice(mask: np.ndarray, label: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    a, b = mask > 0, label > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def geometry_problem(volume: nib.Nifti1Image, scan: nib.Nifti1Image, path: Path) -> str | None:
    """Why a mask or label does not lie on the scan's voxel grid, or None (the dataset check's rule)."""
    return grid_problem(volume, scan, path, Path(scan.get_filename() or "the scan").name)
