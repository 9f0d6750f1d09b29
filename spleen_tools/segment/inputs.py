"""Which scans to segment, and whether each one is a 3D CT in Hounsfield units: one line per problem."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
HU_AIR_BELOW = -300.0  # a CT holds air (about -1000 HU) somewhere
HU_TISSUE_ABOVE = 100.0  # ... and soft tissue, contrast or bone above this


class InputError(Exception):
    """Bad input: each line names the file, what is wrong and what to do."""


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def case_name(path: Path) -> str:
    """``spleen_3.nii.gz`` -> ``spleen_3``."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def list_scans(source: Path) -> list[Path]:
    """One NIfTI file, or every NIfTI file in a folder (sorted)."""
    if source.is_dir():
        scans = sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p))
        if not scans:
            raise InputError(f"{source}: no .nii.gz or .nii files in this folder; give a CT NIfTI file or its folder")
        return scans
    if not source.is_file():
        raise InputError(f"{source}: no such file or folder; give a CT NIfTI file (.nii.gz) or a folder of them")
    return [source]


def scan_problem(path: Path) -> str | None:
    """Why ``path`` is not a 3D CT NIfTI in Hounsfield units, or None."""
    if not is_nifti(path):
        return f"{path}: not a NIfTI file (.nii.gz or .nii); convert the scan first (e.g. dcm2niix for DICOM)"
    try:
        image = nib.load(path)
        shape = image.shape
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises many kinds for truncated or foreign files
        return f"{path}: not a readable NIfTI ({type(err).__name__}: {err}); re-export or re-download the scan"
    dims = [n for n in shape if n > 1]
    if len(shape) < 3 or len(dims) != 3:
        return f"{path}: a {len(dims)}D image of shape {tuple(shape)}; the model segments 3D CT volumes"
    low, high = float(np.min(data)), float(np.max(data))
    if not (low < HU_AIR_BELOW and high > HU_TISSUE_ABOVE):
        return (
            f"{path}: intensities {low:g}..{high:g} do not look like CT in Hounsfield units (air about -1000, soft"
            " tissue 0..100); give the original CT, not a normalised or MR image"
        )
    return None


def check_scans(scans: list[Path]) -> None:
    problems = [p for p in map(scan_problem, scans) if p]
    if problems:
        raise InputError("\n".join(problems))


def find_labels(scans: list[Path], labels_dir: Path) -> dict[Path, Path]:
    """The label of each scan: the file of the same name in ``labels_dir``."""
    missing = [s.name for s in scans if not (labels_dir / s.name).is_file()]
    if missing:
        raise InputError(f"{labels_dir}: no label named {', '.join(missing)}; labels must have their scan's file name")
    return {s: labels_dir / s.name for s in scans}
