"""Which scans to segment, whether each one is a 3D CT in Hounsfield units and each label fits its scan: one line
per problem, all before any inference."""

from __future__ import annotations

from pathlib import Path

from spleen_flare.data_check import NIFTI_SUFFIXES, image_problem, label_problem


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
    """Why ``path`` is not a 3D CT NIfTI in Hounsfield units, or None (the dataset check's image rule)."""
    return image_problem(path)


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


def check_labels(labels: dict[Path, Path]) -> None:
    """Each label readable, one 3D volume on its scan's grid, 0 and 1 only (the dataset check's label rule)."""
    problems = [p for p in (label_problem(label, scan) for scan, label in labels.items()) if p]
    if problems:
        raise InputError("\n".join(problems))
