"""Tests for the MONAI bundle in bundles/spleen_ct_segmentation and the CPU-quick override.

Tiny random NIfTI cases (int16 HU, anisotropic 0.8 x 0.8 x 5 mm voxels, LPS-like axes) stand in for
Task09_Spleen; two of them are thin (12 slices = 30 voxels at 2 mm) so the ROI padding is exercised.
Training runs through the same `python -m monai.bundle run` command a user types.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "spleen_ct_segmentation"
CONFIGS = BUNDLE / "configs"
TRAIN = str(CONFIGS / "train.json")
EVALUATE = str(CONFIGS / "evaluate.json")
INFERENCE = str(CONFIGS / "inference.json")
METADATA = str(CONFIGS / "metadata.json")
CPU_QUICK = str(REPO / "bundles" / "overrides" / "cpu_quick.json")

UNET_PARAMS = 4_808_917  # model-zoo spleen_ct_segmentation UNet
QUICK_ROI = [48, 48, 48]
N_CASES = 11  # the bundle's default split holds out the last 9 sorted cases, so 2 train + 9 validate
THIN_CASES = (0, 10)  # one thin scan in the training split, one in the validation split

# Ids the model-zoo train.json (0.5.x) defines. cpu_quick.json must only touch these (or add new
# top-level ids) so that it also works on top of the official bundle dropped into the same place.
OFFICIAL_TRAIN_IDS = {
    "imports",
    "bundle_root",
    "ckpt_dir",
    "output_dir",
    "dataset_dir",
    "images",
    "labels",
    "val_interval",
    "epochs",
    "device",
    "network_def",
    "network",
    "loss",
    "optimizer",
    "lr_scheduler",
    "train#deterministic_transforms",
    "train#random_transforms",
    "train#preprocessing",
    "train#dataset",
    "train#dataset#cache_rate",
    "train#dataset#num_workers",
    "train#dataloader",
    "train#dataloader#batch_size",
    "train#dataloader#num_workers",
    "train#inferer",
    "train#postprocessing",
    "train#handlers",
    "train#key_metric",
    "train#trainer",
    "train#trainer#amp",
    "train#trainer#max_epochs",
    "validate#preprocessing",
    "validate#dataset",
    "validate#dataset#cache_rate",
    "validate#dataloader",
    "validate#dataloader#num_workers",
    "validate#inferer",
    "validate#postprocessing",
    "validate#handlers",
    "validate#key_metric",
    "validate#additional_metrics",
    "validate#evaluator",
    "validate#evaluator#amp",
    "initialize",
    "run",
}


def _write_case(image_path: Path, label_path: Path | None, n_slices: int, seed: int) -> None:
    """One 112 x 112 x n_slices CT-like volume: air, a soft-tissue body and a brighter 'spleen' blob."""
    rng = np.random.default_rng(seed)
    nx = ny = 112
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(n_slices), indexing="ij")
    cx, cy, cz = nx / 2, ny / 2, n_slices / 2
    body = ((x - cx) / 52) ** 2 + ((y - cy) / 50) ** 2 <= 1
    spleen = ((x - cx - 20) / 14) ** 2 + ((y - cy + 10) / 12) ** 2 + ((z - cz) / max(n_slices / 4, 2)) ** 2 <= 1
    hu = np.full((nx, ny, n_slices), -1000.0)
    hu[body] = 40.0
    hu[spleen] = 110.0
    hu += rng.normal(0.0, 15.0, hu.shape)
    affine = np.diag([-0.8, -0.8, 5.0, 1.0])  # flipped in-plane axes, 5 mm slices, like many MSD scans
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), image_path)
    if label_path is not None:
        nib.save(nib.Nifti1Image(spleen.astype(np.uint8), affine), label_path)


@pytest.fixture(scope="session")
def bundle_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Task09_Spleen-shaped folder: imagesTr/labelsTr with 11 cases, imagesTs with one thin scan."""
    root = tmp_path_factory.mktemp("Task09_Spleen")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir()
    for i in range(N_CASES):
        name = f"spleen_{i:02d}.nii.gz"
        n_slices = 12 if i in THIN_CASES else 24
        _write_case(root / "imagesTr" / name, root / "labelsTr" / name, n_slices, seed=i)
    _write_case(root / "imagesTs" / "spleen_50.nii.gz", None, 12, seed=50)
    return root


@pytest.fixture(scope="session")
def bundle_trained(bundle_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick epoch of train.json + cpu_quick.json via the CLI, run from the bundle folder as documented."""
    bundle_root = tmp_path_factory.mktemp("bundle_root")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','../overrides/cpu_quick.json']",
        "--bundle_root",
        str(bundle_root),
        "--dataset_dir",
        str(bundle_data),
        "--epochs",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "SPLEEN_DATA_DIR"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    wall_s = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return {"root": bundle_root, "log": log, "wall_s": wall_s}


def _parser(*files: str, **overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(list(files))
    parser.read_meta(METADATA)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _run(*files: str, **overrides: object) -> None:
    """In-process equivalent of `python -m monai.bundle run --config_file [files] --key value ...`."""
    # logging_file=False: applying logging.conf in-process would reconfigure pytest's loggers; the CLI test covers it.
    monai.bundle.run(config_file=list(files), meta_file=METADATA, logging_file=False, **overrides)


def test_layout_is_model_zoo_shaped() -> None:
    for rel in (
        "LICENSE",
        "configs/train.json",
        "configs/evaluate.json",
        "configs/inference.json",
        "configs/metadata.json",
        "configs/logging.conf",
        "docs/README.md",
        "docs/data_license.txt",
    ):
        assert (BUNDLE / rel).is_file(), rel
    tracked = subprocess.run(
        ["git", "ls-files", str(BUNDLE)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [f for f in tracked if "/models/" in f or f.endswith((".pt", ".ts", ".onnx"))], "weights in git"


def test_train_components_parse(bundle_data: Path) -> None:
    parser = _parser(TRAIN, CPU_QUICK, dataset_dir=str(bundle_data), bundle_root=str(bundle_data.parent / "unused"))
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert isinstance(trainer, monai.engines.SupervisedTrainer)
    assert isinstance(evaluator, monai.engines.SupervisedEvaluator)
    assert isinstance(parser.get_parsed_content("network_def"), monai.networks.nets.UNet)
    assert isinstance(parser.get_parsed_content("optimizer"), monai.optimizers.Novograd)
    assert len(trainer.data_loader.dataset) == N_CASES - 9
    assert len(evaluator.data_loader.dataset) == 9
    assert list(parser.get_parsed_content("validate#inferer").roi_size) == QUICK_ROI
    assert trainer.amp is False and evaluator.amp is False


def test_unet_parameter_count() -> None:
    for config in (TRAIN, INFERENCE):
        net = _parser(config).get_parsed_content("network_def")
        assert sum(p.numel() for p in net.parameters()) == UNET_PARAMS, config


def test_dataset_dir_from_environment(monkeypatch: pytest.MonkeyPatch, bundle_data: Path) -> None:
    monkeypatch.delenv("SPLEEN_DATA_DIR", raising=False)
    assert _parser(TRAIN).get_parsed_content("dataset_dir") == "/workspace/data/Task09_Spleen"
    monkeypatch.setenv("SPLEEN_DATA_DIR", str(bundle_data))
    for config in (TRAIN, INFERENCE):
        assert _parser(config).get_parsed_content("dataset_dir") == str(bundle_data)
    parser = _parser(TRAIN)
    images, labels = parser.get_parsed_content("images"), parser.get_parsed_content("labels")
    assert len(images) == len(labels) == N_CASES
    assert [Path(i).name for i in images] == [Path(lbl).name for lbl in labels]
    assert len(_parser(INFERENCE).get_parsed_content("datalist")) == 1


def test_cpu_quick_only_overrides_ids_the_official_bundle_has() -> None:
    quick = json.loads(Path(CPU_QUICK).read_text())
    ours = ConfigParser()
    ours.read_config(TRAIN)
    for key in quick:
        if "#" not in key:
            continue  # a new or replaced top-level id works on any train.json
        assert key in OFFICIAL_TRAIN_IDS, f"{key} may not exist in the model-zoo train.json"
        assert key in ours, f"{key} does not exist in our train.json"
    assert not [k for k in quick if k.startswith("network")], "cpu_quick must keep the full-size network"


def test_cpu_quick_has_no_index_paths() -> None:
    """Index paths (train#random_transforms#0#...) differ between our train.json and the official one."""
    quick = json.loads(Path(CPU_QUICK).read_text())
    assert not [k for k in quick if re.search(r"#\d+(#|$)", k)]


def test_thin_scan_is_padded_to_the_roi(bundle_data: Path) -> None:
    thin = {
        "image": str(bundle_data / "imagesTr/spleen_00.nii.gz"),
        "label": str(bundle_data / "labelsTr/spleen_00.nii.gz"),
    }
    parser = _parser(TRAIN)
    deterministic = parser.get_parsed_content("train#deterministic_transforms")
    crop = parser.get_parsed_content("train#random_transforms")[0]
    assert isinstance(crop, monai.transforms.RandCropByPosNegLabeld)

    without_pad = monai.transforms.Compose(
        [t for t in deterministic if not isinstance(t, monai.transforms.SpatialPadd)]
    )
    item = without_pad(thin)
    assert item["image"].shape[-1] < 96  # 12 slices x 5 mm = about 30 voxels at 2 mm: thinner than the 96 crop
    with pytest.raises(Exception, match="larger than the image size"):
        crop(item)

    item = monai.transforms.Compose(deterministic)(thin)
    assert min(item["image"].shape[1:]) >= 96
    samples = crop(item)
    assert len(samples) == 4 and all(s["image"].shape[1:] == (96, 96, 96) for s in samples)


def test_train_one_quick_epoch(bundle_trained: dict) -> None:
    log = bundle_trained["log"]
    assert (bundle_trained["root"] / "models" / "model.pt").is_file()
    assert "Setting logging properties based on config: configs/logging.conf" in log
    assert re.search(r"val_mean_dice: \d\.\d+", log)
    epoch = re.search(r"SupervisedTrainer - INFO - Epoch\[1\] Complete\. Time taken: (\S+)", log)
    assert epoch, log[-2000:]
    print(
        f"quick epoch (2 train + 9 val tiny cases): {epoch.group(1)}; whole CLI call {bundle_trained['wall_s']:.1f} s"
    )


def test_evaluate_with_a_site_datalist(bundle_trained: dict, bundle_data: Path, tmp_path: Path) -> None:
    """evaluate.json on the trained model, with validate#dataset#data replaced the way a site would."""
    cases = [f"spleen_{i:02d}.nii.gz" for i in (10, 3)]  # thin + normal
    site = tmp_path / "site.json"
    site.write_text(
        json.dumps(
            {
                "validate#dataset#data": [
                    {"image": str(bundle_data / "imagesTr" / c), "label": str(bundle_data / "labelsTr" / c)}
                    for c in cases
                ]
            }
        )
    )
    out = tmp_path / "eval"
    _run(TRAIN, CPU_QUICK, EVALUATE, str(site), bundle_root=str(bundle_trained["root"]), output_dir=str(out))
    with open(out / "metrics.csv") as f:
        metrics = dict(csv.reader(f))
    assert 0.0 <= float(metrics["val_mean_dice"]) <= 1.0
    assert "val_accuracy" in metrics
    with open(out / "val_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["filename"]).name for r in rows) == sorted(cases)


def test_inference_writes_a_mask_in_the_scan_space(bundle_trained: dict, bundle_data: Path, tmp_path: Path) -> None:
    _run(
        INFERENCE,
        bundle_root=str(bundle_trained["root"]),
        dataset_dir=str(bundle_data),
        output_dir=str(tmp_path),
        roi_size=QUICK_ROI,
        **{"dataloader#num_workers": 0},
    )
    (pred_path,) = tmp_path.glob("**/*.nii.gz")
    src = nib.load(bundle_data / "imagesTs" / "spleen_50.nii.gz")
    pred = nib.load(pred_path)
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    assert set(np.unique(pred.get_fdata())) <= {0.0, 1.0}


def test_verify_net_in_out() -> None:
    monai.bundle.verify_net_in_out(net_id="network_def", meta_file=METADATA, config_file=INFERENCE, device="cpu")


def test_metadata_matches_configs_and_environment() -> None:
    meta = json.loads(Path(METADATA).read_text())
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "name", "task"):
        assert meta.get(key), key
    for key in ("description", "authors", "copyright", "data_source", "data_type", "intended_use", "references"):
        assert meta.get(key), key
    assert "mean_dice" in meta["eval_metrics"]
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["numpy_version"] == np.__version__
    assert meta["required_packages_version"]["nibabel"] == nib.__version__
    train = _parser(TRAIN)
    net = train.get("network_def")
    inputs, outputs = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert inputs["num_channels"] == net["in_channels"] and outputs["num_channels"] == net["out_channels"]
    assert inputs["spatial_shape"] == train.get("roi_size")


def test_verify_metadata_with_the_shipped_schema(tmp_path) -> None:
    """`python -m monai.bundle verify_metadata` offline: the local schema is used, nothing is downloaded."""
    import shutil

    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    shutil.copy(BUNDLE.parent / "metadata_schema.json", schema)
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(schema))

    broken = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]
    broken_path = tmp_path / "metadata.json"
    broken_path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(broken_path), filepath=str(schema))
