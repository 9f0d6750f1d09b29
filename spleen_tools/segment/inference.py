"""Run a model bundle's own ``configs/inference.json`` (MONAI's ConfigWorkflow) over a list of scans.

The bundle's inference resamples, windows and crops each scan as in training, slides its ROI over it, inverts the
preprocessing and saves the argmax mask in the scan's own space (shape and affine of the input).
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow

from spleen_tools.segment.inputs import InputError, case_name

MASK_POSTFIX = "seg"


def mask_path(output_dir: Path, scan: Path) -> Path:
    """Where the bundle's SaveImaged writes the mask of ``scan`` (``separate_folder`` off)."""
    return output_dir / f"{case_name(scan)}_{MASK_POSTFIX}.nii.gz"


def check_bundle(bundle: Path) -> None:
    needed = ("configs/inference.json", "configs/metadata.json", "models/model.pt")
    missing = [name for name in needed if not (bundle / name).is_file()]
    if missing:
        raise InputError(
            f"{bundle}: not a model bundle (missing {', '.join(missing)}); export one with spleen-export RUN_DIR"
        )


def check_device(device: str) -> None:
    """A device name torch knows and this machine has, else one line naming the fix."""
    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a torch device name; use cpu, cuda or cuda:N") from None
    if wanted.type == "cuda" and (wanted.index or 0) >= torch.cuda.device_count():
        raise InputError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use --device cpu"
        )


def run_inference(bundle: Path, scans: list[Path], output_dir: Path, device: str = "cpu") -> dict[Path, Path]:
    """Segment ``scans`` with the bundle on ``device`` (a torch device name: "cpu", "cuda", "cuda:1");
    returns scan -> mask path. The bundle's AMP follows the device (its default follows CUDA's presence)."""
    check_bundle(bundle)
    check_device(device)
    output_dir.mkdir(parents=True, exist_ok=True)
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,  # keep the caller's logging
        workflow_type="infer",
        bundle_root=str(bundle),
        datalist=[str(s) for s in scans],
        output_dir=str(output_dir),
        output_postfix=MASK_POSTFIX,
        output_dtype="$numpy.uint8",
        separate_folder=False,
        device=f"$torch.device({device!r})",
        **{"dataloader#num_workers": 0, "evaluator#amp": device.startswith("cuda")},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    masks = {scan: mask_path(output_dir, scan) for scan in scans}
    missing = [str(m) for m in masks.values() if not m.is_file()]
    if missing:
        raise RuntimeError(f"the bundle's inference wrote no mask at {', '.join(missing)}")
    return masks
