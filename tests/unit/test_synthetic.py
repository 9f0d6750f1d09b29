"""Synthetic MSD-layout data: layout, dtypes, geometry, determinism and anatomical side."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_tools.data.synthetic import make_synthetic_dataset

SMALL = {"num_train": 3, "num_test": 1, "shape": (48, 48, 12), "spacing": (0.8, 0.8, 5.0)}
MSD_KEYS = {
    "name",
    "description",
    "reference",
    "licence",
    "release",
    "tensorImageSize",
    "modality",
    "labels",
    "numTraining",
    "numTest",
    "training",
    "test",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=3, **SMALL)


def test_layout_and_dataset_json(task_dir: Path) -> None:
    assert task_dir.name == "Task09_Spleen"
    meta = json.loads((task_dir / "dataset.json").read_text())
    assert set(meta) == MSD_KEYS
    assert meta["name"] == "Spleen" and meta["licence"] == "CC-BY-SA 4.0" and meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"} and meta["labels"] == {"0": "background", "1": "spleen"}
    assert meta["numTraining"] == len(meta["training"]) == 3 and meta["numTest"] == len(meta["test"]) == 1
    for case in meta["training"]:
        assert case["image"].startswith("./imagesTr/spleen_") and case["image"].endswith(".nii.gz")
        assert case["label"] == case["image"].replace("imagesTr", "labelsTr")
        assert (task_dir / case["image"]).is_file() and (task_dir / case["label"]).is_file()
    assert all(t.startswith("./imagesTs/spleen_") and (task_dir / t).is_file() for t in meta["test"])
    listed = {Path(c["image"]).name for c in meta["training"]}
    assert {p.name for p in (task_dir / "imagesTr").iterdir()} == listed
    assert {p.name for p in (task_dir / "labelsTr").iterdir()} == listed
    assert not [p for p in task_dir.parent.iterdir() if p.name.startswith(".")]  # temp folder renamed away


def test_dtypes_values_and_geometry(task_dir: Path) -> None:
    meta = json.loads((task_dir / "dataset.json").read_text())
    for case in meta["training"]:
        img, lab = nib.load(task_dir / case["image"]), nib.load(task_dir / case["label"])
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        image, label = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1}
        assert image.shape == label.shape and image.shape[:2] == (48, 48) and 8 <= image.shape[2] <= 16
        assert image.min() <= -950 and image[label == 1].mean() > image[label == 0].mean()
        assert 90 < image[label == 1].mean() < 140  # spleen HU
        assert np.allclose(img.header.get_zooms(), (0.8, 0.8, 5.0))  # anisotropic, as in MSD
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # stored like the real MSD files
        assert np.allclose(img.affine, lab.affine)


def test_deterministic(tmp_path: Path, task_dir: Path) -> None:
    again = make_synthetic_dataset(tmp_path / "again", seed=3, **SMALL)
    files = sorted(p.relative_to(task_dir) for p in task_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (task_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = make_synthetic_dataset(tmp_path / "other", seed=4, **SMALL)
    assert json.loads((other / "dataset.json").read_text()) != json.loads((task_dir / "dataset.json").read_text())


# MONAI/torch emit deprecation notices on import and for Orientationd's default labels; not ours to fix here.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_spleen_on_patients_left_after_monai_ras(task_dir: Path) -> None:
    """In RAS (nibabel/MONAI), index along x grows toward the patient's Right: the left is the low-x half."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    keys = ["image", "label"]
    load = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS")])
    meta = json.loads((task_dir / "dataset.json").read_text())
    for case in meta["training"]:
        data = load({k: str(task_dir / case[k]) for k in keys})
        label = data["label"]
        assert nib.aff2axcodes(label.affine.numpy()) == ("R", "A", "S")
        com = np.argwhere(label[0].numpy() > 0).mean(axis=0)
        assert com[0] < label.shape[1] / 2  # patient's left
        assert com[1] < label.shape[2] / 2  # posterior half (A grows with y)
        world = label.affine.numpy() @ np.append(com, 1.0)
        assert world[0] < 0  # RAS+ world: negative x is the patient's left


def test_refuses_to_replace_real_data(tmp_path: Path) -> None:
    real = tmp_path / "Task09_Spleen"
    real.mkdir()
    (real / "dataset.json").write_text(json.dumps({"description": "Spleen Segmentation"}))
    with pytest.raises(FileExistsError, match="not synthetic"):
        make_synthetic_dataset(tmp_path, **SMALL)
    assert (real / "dataset.json").is_file()


def test_default_size_is_fast(tmp_path: Path) -> None:
    import time

    start = time.perf_counter()
    task = make_synthetic_dataset(tmp_path)
    assert time.perf_counter() - start < 5
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["numTraining"] == 12 and meta["numTest"] == 2
    depths = {nib.load(task / c["image"]).shape[2] for c in meta["training"]}
    assert len(depths) > 1 and min(depths) >= 20 and max(depths) <= 28  # slice count varies like real scans


def test_intensity_offset_shifts_every_voxel_and_keeps_labels(tmp_path: Path, task_dir: Path) -> None:
    """A site's calibration offset: same anatomy and noise, every voxel +offset HU (clipped to int16 HU range)."""
    shifted = make_synthetic_dataset(tmp_path / "shifted", seed=3, intensity_offset=60.0, **SMALL)
    meta = json.loads((task_dir / "dataset.json").read_text())
    assert json.loads((shifted / "dataset.json").read_text()) == meta
    for case in meta["training"]:
        base, moved = (np.asarray(nib.load(d / case["image"]).dataobj).astype(np.int32) for d in (task_dir, shifted))
        unclipped = base > -1024
        diff = moved[unclipped] - base[unclipped]
        assert np.abs(diff - 60).max() <= 1 and np.mean(diff == 60) > 0.99  # float32 rounding at .5 aside
        assert (task_dir / case["label"]).read_bytes() == (shifted / case["label"]).read_bytes()
        label = np.asarray(nib.load(shifted / case["label"]).dataobj)
        assert 150 < moved[label == 1].mean() < 200


def test_zero_offset_is_the_default_output(tmp_path: Path, task_dir: Path) -> None:
    explicit = make_synthetic_dataset(tmp_path / "zero", seed=3, intensity_offset=0.0, **SMALL)
    for path in sorted(p for p in task_dir.rglob("*") if p.is_file()):
        assert (explicit / path.relative_to(task_dir)).read_bytes() == path.read_bytes()


def test_site_styles_spacing_and_shape(tmp_path: Path) -> None:
    """Non-IID sites: another slice spacing and field of view are written into the files' geometry."""
    task = make_synthetic_dataset(tmp_path, num_train=1, num_test=0, shape=(56, 60, 16), spacing=(0.8, 0.8, 3.0))
    image = nib.load(next((task / "imagesTr").iterdir()))
    assert image.shape[:2] == (56, 60) and np.allclose(image.header.get_zooms(), (0.8, 0.8, 3.0))


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), 1500.0])
def test_bad_intensity_offset(tmp_path: Path, offset: float) -> None:
    with pytest.raises(ValueError, match="intensity_offset"):
        make_synthetic_dataset(tmp_path, intensity_offset=offset, **SMALL)
    assert not (tmp_path / "Task09_Spleen").exists()
