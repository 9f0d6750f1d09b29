"""Segment scans with a model bundle: check the inputs, run the bundle's inference, measure, draw, record."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_tools.segment.inference import check_bundle, check_device, run_inference
from spleen_tools.segment.inputs import case_name, check_labels, check_scans, find_labels, list_scans
from spleen_tools.segment.measures import dice, geometry_problem, spleen_volume_ml
from spleen_tools.segment.overlay import write_overlay

RESULTS_FILE = "segmentation.json"


def measure(scan: Path, mask_file: Path, label: Path | None, output_dir: Path) -> dict:
    """One scan's volume, optional Dice, overlay PNG; raises if the mask is not on the scan's grid."""
    scan_img, mask_img = nib.load(scan), nib.load(mask_file)
    problem = geometry_problem(mask_img, scan_img, mask_file)
    if problem:
        raise RuntimeError(problem)
    row = {"scan": str(scan), "mask": str(mask_file), "spleen_ml": round(spleen_volume_ml(mask_img), 1)}
    title = f"{case_name(scan)}: spleen {row['spleen_ml']} mL"
    if label is not None:  # checked before inference: on the scan's grid, 0 and 1 only
        label_img = nib.load(label)
        row["dice"] = round(dice(np.asanyarray(mask_img.dataobj), np.asanyarray(label_img.dataobj)), 4)
        title += f", Dice {row['dice']}"
    overlay = write_overlay(scan, mask_file, output_dir / f"{case_name(scan)}_overlay.png", title)
    row["overlay"] = str(overlay)
    return row


def segment(
    bundle: Path,
    source: Path,
    output_dir: Path,
    labels_dir: Path | None = None,
    out: Callable[[str], None] = print,
    device: str = "cpu",
) -> list[dict]:
    """Masks (NIfTI, the scan's shape and affine), volumes, overlays and Dice where labels are given."""
    scans = list_scans(source)
    check_scans(scans)  # every problem before any work
    labels = find_labels(scans, labels_dir) if labels_dir else {}
    check_labels(labels)
    check_bundle(bundle)
    check_device(device)
    out(f"segmenting {len(scans)} scan(s) with {bundle} ...")
    masks = run_inference(bundle, scans, output_dir, device)
    rows = []
    for scan in scans:
        row = measure(scan, masks[scan], labels.get(scan), output_dir)
        rows.append(row)
        dice_text = f", Dice {row['dice']}" if "dice" in row else ""
        out(f"{scan.name}: spleen {row['spleen_ml']} mL{dice_text}; mask {row['mask']}; overlay {row['overlay']}")
    (output_dir / RESULTS_FILE).write_text(json.dumps({"bundle": str(bundle), "scans": rows}, indent=2) + "\n")
    return rows
