"""What a site's cases must be before training: each image a readable 3D CT NIfTI in Hounsfield units with sane
spacing and finite voxels, each label readable, one 3D volume on its image's grid (shape, affine) holding 0 and 1
only.

Job side (ships in ``app/custom``): a site checks its own cases when the job starts, because in a real deployment
nobody else can read its data; the host's ``spleen-check-data`` and ``spleen-segment`` use the same rules. Each
problem is one line: the file, what is wrong, the fix.

A NIfTI file is someone else's bytes: its header may declare far more voxels than the file holds (a gzip stream of
1 MB inflates to 1 GB; a 70-byte one can declare 16 GB). So the sizes the header declares are checked before
nibabel reads anything past the header (its extensions included), and voxels are read a chunk at a time: the check
needs about ``CHUNK_VOXELS`` of memory whatever the file declares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener

from spleen_flare.contract import PROGRESS_TAG, tagged_line

NIFTI_SUFFIXES = (".nii.gz", ".nii")
HU_AIR_BELOW = -300.0  # a CT holds air (about -1000 HU) somewhere
HU_TISSUE_ABOVE = 100.0  # ... and soft tissue, contrast or bone above this
SPACING_MM = (0.1, 20.0)  # voxel sizes outside this are a broken header, not a scanner
AFFINE_TOLERANCE_MM = 1e-3
# The most voxels a scan's header may declare: twice the longest CT (512 x 512 x ~1000 slices; the MSD spleen data
# at most 512 x 512 x 168), 1 GiB as int16 and 2 GiB as the float32 copy MONAI trains and infers on.
MAX_VOXELS = 512 * 512 * 2048
MAX_HEADER_BYTES = 16 * 2**20  # header and extensions before the voxels: nibabel (and MONAI) read them whole
CHUNK_VOXELS = 2**22  # voxels read at a time: 32 MB as float64 after scaling
_FORMATS = ((nib.Nifti1Header, nib.Nifti1Image), (nib.Nifti2Header, nib.Nifti2Image))


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _unreadable(path: Path, err: Exception) -> str:
    return f"{path}: not a readable NIfTI ({_one_line(err)}); re-export or re-download it"


def _read_header(path: Path) -> tuple[nib.Nifti1Header, type[nib.Nifti1Image], bool]:
    """The header (NIfTI-1 or -2, told by its size field), the image class that reads it, whether extensions
    follow it (nibabel looks at the first byte after the header)."""
    with ImageOpener(path) as f:
        block = f.read(nib.Nifti2Header.template_dtype.itemsize + 4)
    for header_class, image_class in _FORMATS:
        size = header_class.template_dtype.itemsize  # 348 or 540
        if len(block) >= size + 4 and size in (int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")):
            return header_class(block[:size], check=False), image_class, block[size] != 0
    raise ValueError("no NIfTI-1 or NIfTI-2 header")


def _extensions_problem(path: Path, start: int, end: int, endianness: str) -> str | None:
    """nibabel reads each header extension whole, as big as its size field says: each must end before the voxels."""
    if end < start:
        return f"{path}: header extensions but the voxels start at byte {end}, inside the header; re-export the scan"
    with ImageOpener(path) as f:
        f.seek(start)
        while end - start >= 16:  # nibabel's own loop condition
            field = f.read(8)
            esize = int(np.frombuffer(field[:4], np.dtype(f"{endianness}i4"))[0]) if len(field) == 8 else 0
            if esize < 16 or start + esize > end:
                return (
                    f"{path}: a header extension of {esize} bytes at byte {start} does not end before the voxels (byte"
                    f" {end}); re-export the scan (e.g. with dcm2niix)"
                )
            f.seek(esize - 8, 1)
            start += esize
    return None


def declared_size_problem(path: Path) -> tuple[type[nib.Nifti1Image] | None, str | None]:
    """The image class to load ``path`` with, or why the sizes its header declares are not a scan's (too many
    voxels, extensions past the voxels, voxels past the end of an uncompressed file). Reads the header only."""
    header, image_class, extended = _read_header(path)
    shape, dtype = header.get_data_shape(), header.get_data_dtype()
    voxels, offset = math.prod(shape), int(header["vox_offset"])
    if voxels > MAX_VOXELS:
        return None, (
            f"{path}: its header declares {'x'.join(map(str, shape))} {dtype.name} voxels ({voxels / 1e6:.0f} M,"
            f" {voxels * dtype.itemsize / 1e9:.1f} GB), over the {MAX_VOXELS / 1e6:.0f} M a CT holds; crop or resample"
            " the scan, or, for a genuine larger one, raise MAX_VOXELS in spleen_flare/data_check.py"
        )
    if not 0 <= offset <= MAX_HEADER_BYTES:
        return None, f"{path}: its voxels start at byte {offset}, past any NIfTI header; re-export the scan"
    if extended:
        problem = _extensions_problem(path, header.template_dtype.itemsize + 4, offset, header.endianness)
        if problem:
            return None, problem
    needed, size = offset + voxels * dtype.itemsize, path.stat().st_size
    if not path.name.endswith(".gz") and needed > size:
        return None, (
            f"{path}: its header declares {needed:,} bytes (voxels to byte {needed:,}), the file holds {size:,};"
            " it is truncated or its header is wrong: re-export or re-download it"
        )
    return image_class, None


def _load(path: Path) -> tuple[nib.Nifti1Image | None, str | None]:
    """The image (header read, no voxels) once its declared sizes are checked, or the problem."""
    if not path.name.endswith(NIFTI_SUFFIXES):
        return None, f"{path}: not a NIfTI file (.nii.gz or .nii); convert the scan first (e.g. dcm2niix for DICOM)"
    try:
        image_class, problem = declared_size_problem(path)
        return (image_class.from_filename(path), None) if image_class else (None, problem)
    except Exception as err:  # nibabel raises many kinds for truncated or foreign files
        return None, _unreadable(path, err)


def _voxel_chunks(image: nib.Nifti1Image) -> Iterator[np.ndarray]:
    """The voxels in file order, scaled as nibabel scales them, ``CHUNK_VOXELS`` at a time, read forward through
    one open stream (a gzip file is not read again from its start for each chunk)."""
    proxy = image.dataobj
    count = math.prod(proxy.shape)
    spec = ((count,), proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
    flat = ArrayProxy(proxy.file_like, spec, mmap=False, keep_file_open=True)
    for start in range(0, count, CHUNK_VOXELS):
        yield flat[start : start + CHUNK_VOXELS]


def _finite_range(image: nib.Nifti1Image) -> tuple[float, float, int]:
    """The lowest and highest finite voxel, and how many are NaN or infinite."""
    low, high, bad = math.inf, -math.inf, 0
    for chunk in _voxel_chunks(image):
        if chunk.dtype.kind == "f":
            finite = np.isfinite(chunk)
            if not finite.all():
                bad += chunk.size - int(np.count_nonzero(finite))
                chunk = chunk[finite]
        if chunk.size:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    return low, high, bad


def _intensity_problem(path: Path, image: nib.Nifti1Image) -> str | None:
    try:
        low, high, bad = _finite_range(image)
    except Exception as err:  # a stream that ends early or does not inflate
        return _unreadable(path, err)
    if bad:
        return (
            f"{path}: {bad} voxels are NaN or infinite; a CT holds finite Hounsfield units: fix the conversion that"
            " wrote it (or set those voxels to air, -1024)"
        )
    if not (low < HU_AIR_BELOW and high > HU_TISSUE_ABOVE):
        return (
            f"{path}: intensities {low:g}..{high:g} do not look like CT in Hounsfield units (air about -1000, soft"
            " tissue 0..100); give the original CT, not a normalised or MR image"
        )
    return None


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a 3D CT NIfTI in Hounsfield units with sane spacing, or None."""
    image, problem = _load(path)
    if problem:
        return problem
    dims = [n for n in image.shape if n > 1]
    if len(image.shape) < 3 or len(dims) != 3:
        return f"{path}: a {len(dims)}D image of shape {tuple(image.shape)}; the model segments 3D CT volumes"
    spacing = [float(z) for z in image.header.get_zooms()[:3]]
    if not all(SPACING_MM[0] <= z <= SPACING_MM[1] for z in spacing) or not np.isfinite(image.affine).all():
        return f"{path}: voxel spacing {spacing} mm is not plausible; fix the NIfTI header (pixdim, affine)"
    return _intensity_problem(path, image)


def grid_problem(volume: nib.Nifti1Image, image: nib.Nifti1Image, path: Path, image_name: str) -> str | None:
    """Why ``volume`` (a label or a mask at ``path``) does not lie on ``image``'s voxel grid, or None."""
    if volume.shape[:3] != image.shape[:3]:
        shapes = f"shape {tuple(volume.shape)} differs from its image's {tuple(image.shape)}"
        return f"{path}: {shapes}; use the label made for {image_name}"
    if not np.allclose(volume.affine, image.affine, atol=AFFINE_TOLERANCE_MM):
        what = f"its affine (position, orientation, spacing) differs from {image_name}'s"
        return f"{path}: {what}; re-export image and label together"
    return None


def _label_values(label: nib.Nifti1Image) -> np.ndarray:
    """The distinct values of ``label``, the 7 smallest at most (enough to show 6 and say there are more)."""
    found = np.array([])
    for chunk in _voxel_chunks(label):
        found = np.unique(np.concatenate([found, np.unique(chunk)]))[:7]
    return found


def label_problem(label: Path, image_path: Path) -> str | None:
    """Why ``label`` does not fit its image (unreadable, not one 3D volume, other grid, values other than 0 and 1),
    or None."""
    lab, problem = _load(label)
    if problem:
        return problem
    image, problem = _load(image_path)
    if problem:
        return problem
    if any(n > 1 for n in lab.shape[3:]):
        return (
            f"{label}: a {len(lab.shape)}D label of shape {tuple(lab.shape)}; a spleen label is one 3D volume of 0"
            " and 1 on its scan's grid"
        )
    problem = grid_problem(lab, image, label, image_path.name)
    if problem:
        return problem
    try:
        found = _label_values(lab)
    except Exception as err:  # a stream that ends early or does not inflate
        return _unreadable(label, err)
    if not set(found.tolist()) <= {0, 1}:
        shown = ", ".join(f"{v:g}" for v in found[:6])
        return f"{label}: holds values {shown}{' ...' if found.size > 6 else ''}; a spleen label holds 0 and 1 only"
    return None


def _malformed(case: object) -> str | None:
    """Why a datalist entry is not ``{"image": path, "label": path}`` (the label may be absent), or None."""
    if isinstance(case, Mapping) and isinstance(case.get("image"), str) and case["image"]:
        if case.get("label") is None or isinstance(case["label"], str):
            return None
    shown = repr(case) if len(repr(case)) <= 80 else repr(case)[:77] + "..."
    return f"datalist entry {shown} is not {{'image': path, 'label': path}}; fix the datalist (spleen-datalists)"


def case_problems(cases: Iterable[Mapping[str, str]]) -> list[str]:
    """Every problem of these ``{"image", "label"}`` cases, one line each (a label only once its image is fine)."""
    problems = []
    for case in cases:
        problem = _malformed(case)
        if problem is None:
            image = Path(case["image"])
            problem = image_problem(image)
            if problem is None and case.get("label"):
                problem = label_problem(Path(case["label"]), image)
        problems += [problem] if problem else []
    return problems


class SiteDataError(RuntimeError):
    """A site's cases cannot be used; its ``data_error`` lines say which file and why."""


def check_site_cases(site: str, cases: list[dict], error: type[SiteDataError] = SiteDataError) -> None:
    """Before anything opens them: every problem of this site's cases, one ``data_error`` line each in the job's log
    (the host cannot read a site's data in a real deployment; the one command prints these lines), then stop."""
    problems = case_problems(cases)
    for problem in problems:
        print(tagged_line(PROGRESS_TAG, kind="data_error", site=site, problem=problem), flush=True)
    if problems:
        raise error(f"{site}: {len(problems)} problem(s) in its cases; first: {problems[0]}")
