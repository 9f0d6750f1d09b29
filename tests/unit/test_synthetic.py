"""Synthetic MSD-layout data: layout, dtypes, geometry, determinism, anatomical side, contrast phase and noise."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_tools.data.synthetic import NOISE_SD, PHASES, make_synthetic_dataset

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


# sha256 of the uncompressed files of make_synthetic_dataset(num_train=1, num_test=0, shape=(24, 24, 8), seed=7), as
# the generator wrote them before contrast phases existed. Recorded benchmark figures and the demo's Dice rest on
# the default look: a change of these bytes must be deliberate (then record the figures again and update these).
PINNED = {
    "dataset.json": "b20d785bdac74d221395c1d3362d17416b8611f36e09f58b9460846bae6661e3",
    "imagesTr/spleen_2.nii.gz": "8a7efbffccda7e0f71ee7070b93d814a42906ed7bc79a7840f9fd36b1ff3fbc4",
    "labelsTr/spleen_2.nii.gz": "f86c6065f177fc525dcf454312661e178ed3890eca79144a98be920a6cb74f3f",
}
PINNED_OFFSET_60_IMAGE = "15ea6f204f23f67f193cc1e2c89a18d70abbe9fc97e46b7dffb12181a4c20246"
PHASE_CASES = {"num_train": 2, "num_test": 0, "shape": (48, 48, 12), "spacing": (0.8, 0.8, 5.0), "seed": 5}


def _content_sha256(path: Path) -> str:
    """Of the uncompressed bytes: the pin holds the voxels and header, not one zlib version's compression."""
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if path.suffix == ".gz" else data).hexdigest()


def test_default_output_is_pinned(tmp_path: Path) -> None:
    task = make_synthetic_dataset(tmp_path / "default", num_train=1, num_test=0, shape=(24, 24, 8), seed=7)
    assert {rel: _content_sha256(task / rel) for rel in PINNED} == PINNED
    explicit = make_synthetic_dataset(
        tmp_path / "explicit", num_train=1, num_test=0, shape=(24, 24, 8), seed=7, phase=None, noise_sd=NOISE_SD
    )
    assert {rel: _content_sha256(explicit / rel) for rel in PINNED} == PINNED
    shifted = make_synthetic_dataset(
        tmp_path / "shifted", num_train=1, num_test=0, shape=(24, 24, 8), seed=7, intensity_offset=60.0
    )
    assert _content_sha256(shifted / "imagesTr/spleen_2.nii.gz") == PINNED_OFFSET_60_IMAGE


def _read(task: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image as int32, label) of every training case, read back from the written NIfTI files."""
    meta = json.loads((task / "dataset.json").read_text())
    cases = []
    for case in meta["training"]:
        image, label = (np.asarray(nib.load(task / case[k]).dataobj) for k in ("image", "label"))
        cases.append((image.astype(np.int32), label))
    return cases


@pytest.fixture(scope="module")
def phases(tmp_path_factory: pytest.TempPathFactory) -> dict[str | None, Path]:
    root = tmp_path_factory.mktemp("phases")
    return {phase: make_synthetic_dataset(root / str(phase), phase=phase, **PHASE_CASES) for phase in (None, *PHASES)}


def test_phase_spleen_hu_in_the_phase_range(phases: dict) -> None:
    for phase, (low, high) in (("non_contrast", (40, 50)), ("portal_venous", (120, 160))):
        for image, label in _read(phases[phase]):
            assert label.sum() > 50
            assert low - 3 < image[label == 1].mean() < high + 3, phase  # the mean of noise 12 over the spleen
    for image, label in _read(phases[None]):
        assert 97 < image[label == 1].mean() < 133  # the default look: 100-130 HU


def test_same_seed_same_anatomy_and_noise_in_every_phase(phases: dict) -> None:
    meta = json.loads((phases[None] / "dataset.json").read_text())
    for case in meta["training"]:
        labels = {(task / case["label"]).read_bytes() for task in phases.values()}
        assert len(labels) == 1
    (nc, _), (pv, _) = _read(phases["non_contrast"])[0], _read(phases["portal_venous"])[0]
    assert np.median(pv - nc) == 0  # soft tissue, fat, bone and air: the same noise, the same HU


def test_liver_and_vessels_change_with_the_phase(phases: dict) -> None:
    """Same seed, same noise: pv - nc is the enhancement. Liver +35..65 HU; vessels (+105..145) in portal venous
    above 145 HU and in non-contrast below 50 HU; the aorta runs through every slice."""
    for (nc, label), (pv, _) in zip(_read(phases["non_contrast"]), _read(phases["portal_venous"]), strict=True):
        diff, outside = pv - nc, label == 0
        liver = outside & (diff >= 34) & (diff <= 66)
        vessels = outside & (diff > 90)
        assert liver.sum() > 1000 and 55 - 2 < nc[liver].mean() < 65 + 2 and 100 - 2 < pv[liver].mean() < 120 + 2
        x_liver = np.argwhere(liver)[:, 0].mean()
        assert x_liver < nc.shape[0] / 2  # the patient's right (array axis 0 grows to the left)
        assert vessels.any(axis=(0, 1)).all()  # the aorta: on every slice
        assert pv[vessels].mean() > 145 and nc[vessels].mean() < 50
        assert vessels.sum(axis=(0, 1)).max() > 1.5 * vessels.sum(axis=(0, 1)).min()  # + the splenic/portal vein


def test_phase_is_recorded_in_dataset_json_only_when_given(phases: dict) -> None:
    for phase, task in phases.items():
        meta = json.loads((task / "dataset.json").read_text())
        assert meta.get("contrast_phase") == phase
        assert set(meta) == (MSD_KEYS if phase is None else MSD_KEYS | {"contrast_phase"})


def _noise_sd(image: np.ndarray) -> float:
    """Noise from neighbouring voxels inside the body: the median absolute difference, robust to the edges."""
    a, b = image[1:, :, :], image[:-1, :, :]
    inside = (a > -500) & (b > -500)
    return float(np.median(np.abs(a - b)[inside]) / (0.6745 * np.sqrt(2)))


@pytest.mark.parametrize("noise_sd", [4.0, 12.0, 30.0])
def test_noise_sd_is_the_measured_noise(tmp_path: Path, noise_sd: float) -> None:
    task = make_synthetic_dataset(tmp_path, noise_sd=noise_sd, **SMALL)
    for image, _ in _read(task):
        assert _noise_sd(image) == pytest.approx(noise_sd, rel=0.15)
    meta = json.loads((task / "dataset.json").read_text())
    assert meta.get("noise_sd") == (None if noise_sd == NOISE_SD else noise_sd)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"phase": "arterial"}, "phase must be None or one of portal_venous, non_contrast, got 'arterial'"),
        ({"phase": ""}, "phase must be None or one of"),
        ({"noise_sd": -1.0}, "noise_sd must be a HU standard deviation between 0 and 100"),
        ({"noise_sd": float("nan")}, "noise_sd must be"),
        ({"noise_sd": 150.0}, "noise_sd must be"),
        ({"spacing": (0.8, 0.8, 0.5)}, r"spacing\[2\] \(slice thickness\) must be between 1 and 5 mm, got 0.5"),
        ({"spacing": (0.8, 0.8, 6.0)}, r"spacing\[2\] \(slice thickness\) must be between 1 and 5 mm"),
        ({"spacing": (0.0, 0.8, 3.0)}, "spacing must be three positive millimetre values"),
        ({"spacing": (float("nan"), 0.8, 3.0)}, "spacing must be three positive millimetre values"),
        ({"spacing": (0.8, 0.8)}, "spacing must be three positive millimetre values"),
    ],
)
def test_bad_phase_noise_or_spacing(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_synthetic_dataset(tmp_path, **(SMALL | kwargs))
    assert not (tmp_path / "Task09_Spleen").exists()


@pytest.mark.parametrize("thickness", [1.0, 5.0])
def test_slice_thickness_bounds_are_allowed(tmp_path: Path, thickness: float) -> None:
    task = make_synthetic_dataset(tmp_path, phase="portal_venous", **(SMALL | {"spacing": (0.8, 0.8, thickness)}))
    image = nib.load(next((task / "imagesTr").iterdir()))
    assert image.header.get_zooms()[2] == pytest.approx(thickness)
