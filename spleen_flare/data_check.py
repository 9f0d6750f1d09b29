"""What a site's cases must be before training: each image a readable 3D CT NIfTI in Hounsfield units with sane
spacing, each label readable, on its image's grid (shape, affine) and holding 0 and 1 only.

Job side (ships in ``app/custom``): a site checks its own cases when the job starts, because in a real deployment
nobody else can read its data; the host's ``spleen-check-data`` and ``spleen-segment`` use the same rules. Each
problem is one line: the file, what is wrong, the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
HU_AIR_BELOW = -300.0  # a CT holds air (about -1000 HU) somewhere
HU_TISSUE_ABOVE = 100.0  # ... and soft tissue, contrast or bone above this
SPACING_MM = (0.1, 20.0)  # voxel sizes outside this are a broken header, not a scanner
AFFINE_TOLERANCE_MM = 1e-3


def _load(path: Path) -> tuple[nib.Nifti1Image | None, np.ndarray | None, str | None]:
    if not path.name.endswith(NIFTI_SUFFIXES):
        return (
            None,
            None,
            f"{path}: not a NIfTI file (.nii.gz or .nii); convert the scan first (e.g. dcm2niix for DICOM)",
        )
    try:
        image = nib.load(path)
        return image, np.asanyarray(image.dataobj), None
    except Exception as err:  # nibabel raises many kinds for truncated or foreign files
        return None, None, f"{path}: not a readable NIfTI ({type(err).__name__}: {err}); re-export or re-download it"


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a 3D CT NIfTI in Hounsfield units with sane spacing, or None."""
    image, data, problem = _load(path)
    if problem:
        return problem
    dims = [n for n in image.shape if n > 1]
    if len(image.shape) < 3 or len(dims) != 3:
        return f"{path}: a {len(dims)}D image of shape {tuple(image.shape)}; the model segments 3D CT volumes"
    low, high = float(np.min(data)), float(np.max(data))
    if not (low < HU_AIR_BELOW and high > HU_TISSUE_ABOVE):
        return (
            f"{path}: intensities {low:g}..{high:g} do not look like CT in Hounsfield units (air about -1000, soft"
            " tissue 0..100); give the original CT, not a normalised or MR image"
        )
    spacing = [float(z) for z in image.header.get_zooms()[:3]]
    if not all(SPACING_MM[0] <= z <= SPACING_MM[1] for z in spacing) or not np.isfinite(image.affine).all():
        return f"{path}: voxel spacing {spacing} mm is not plausible; fix the NIfTI header (pixdim, affine)"
    return None


def grid_problem(volume: nib.Nifti1Image, image: nib.Nifti1Image, path: Path, image_name: str) -> str | None:
    """Why ``volume`` (a label or a mask at ``path``) does not lie on ``image``'s voxel grid, or None."""
    if volume.shape[:3] != image.shape[:3]:
        shapes = f"shape {tuple(volume.shape)} differs from its image's {tuple(image.shape)}"
        return f"{path}: {shapes}; use the label made for {image_name}"
    if not np.allclose(volume.affine, image.affine, atol=AFFINE_TOLERANCE_MM):
        what = f"its affine (position, orientation, spacing) differs from {image_name}'s"
        return f"{path}: {what}; re-export image and label together"
    return None


def label_problem(label: Path, image_path: Path) -> str | None:
    """Why ``label`` does not fit its image (unreadable, other grid, values other than 0 and 1), or None."""
    lab, values, problem = _load(label)
    if problem:
        return problem
    problem = grid_problem(lab, nib.load(image_path), label, image_path.name)
    if problem:
        return problem
    found = np.unique(values)
    if not set(found.tolist()) <= {0, 1}:
        shown = ", ".join(f"{v:g}" for v in found[:6])
        return f"{label}: holds values {shown}{' ...' if found.size > 6 else ''}; a spleen label holds 0 and 1 only"
    return None


def case_problems(cases: Iterable[Mapping[str, str]]) -> list[str]:
    """Every problem of these ``{"image", "label"}`` cases, one line each (a label only once its image is fine)."""
    problems = []
    for case in cases:
        image = Path(case["image"])
        problem = image_problem(image)
        if problem is None and case.get("label"):
            problem = label_problem(Path(case["label"]), image)
        problems += [problem] if problem else []
    return problems
