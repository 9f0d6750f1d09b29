"""A PNG per scan: the axial slice with the largest spleen area and a coronal view, mask outline on the CT.

Radiological convention, as CT is read: the patient's right on the viewer's left, anterior (axial) and superior
(coronal) up.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

CT_WINDOW = (-160.0, 240.0)  # abdominal window: level 40 HU, width 400 HU


def _views(ct: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """Axial index with the most spleen voxels, coronal index through the spleen's centre (or the middle)."""
    if mask.any():
        axial = int(np.argmax(mask.sum(axis=(0, 1))))
        coronal = int(round(np.nonzero(mask)[1].mean()))
    else:
        axial, coronal = ct.shape[2] // 2, ct.shape[1] // 2
    return axial, coronal


def write_overlay(scan: Path, mask_file: Path, out: Path, title: str) -> Path:
    """Both views from RAS+ arrays (nibabel's closest canonical), true voxel aspect ratios."""
    ct_img = nib.as_closest_canonical(nib.load(scan))
    mask_img = nib.as_closest_canonical(nib.load(mask_file))
    ct = np.asanyarray(ct_img.dataobj).astype(np.float32)
    mask = np.asanyarray(mask_img.dataobj) > 0
    sx, sy, sz = ct_img.header.get_zooms()[:3]
    axial, coronal = _views(ct, mask)
    fig, (ax_a, ax_c) = plt.subplots(1, 2, figsize=(10, 5))
    views = (
        (ax_a, ct[::-1, :, axial].T, mask[::-1, :, axial].T, sy / sx, f"axial slice {axial}"),
        (ax_c, ct[::-1, coronal, :].T, mask[::-1, coronal, :].T, sz / sx, f"coronal slice {coronal}"),
    )
    for ax, image, outline, aspect, label in views:
        ax.imshow(image, cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], origin="lower", aspect=aspect)
        if outline.any():
            ax.contour(outline.astype(np.uint8), levels=[0.5], colors="red", linewidths=1.2, origin="lower")
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
