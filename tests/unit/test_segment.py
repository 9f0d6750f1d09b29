"""spleen-segment: the exported bundle's inference on synthetic NIfTI scans, measures, overlays, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from model_jobs import make_downloaded_job
from PIL import Image

from spleen_tools.cli.segment import main as segment_main
from spleen_tools.data.synthetic import make_synthetic_dataset
from spleen_tools.model_bundle import export_bundle, source_from_job
from spleen_tools.segment.measures import dice, spleen_volume_ml


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    job = make_downloaded_job(tmp_path_factory.mktemp("job_result"))
    return export_bundle(source_from_job(job), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), num_train=2, num_test=0, shape=(48, 48, 12))


def test_masks_lie_on_their_scans_with_volume_overlay_and_dice(bundle, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--bundle", str(bundle), "--input", str(dataset / "imagesTr"), "--output", str(out)]
    assert segment_main([*args, "--labels", str(dataset / "labelsTr")]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "segmentation.json").read_text())["scans"]
    assert len(rows) == 2
    for row in rows:
        scan, mask = nib.load(row["scan"]), nib.load(row["mask"])
        assert mask.shape == scan.shape
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-4)
        assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
        assert row["spleen_ml"] == pytest.approx(spleen_volume_ml(mask), abs=0.05)
        label = np.asanyarray(nib.load(dataset / "labelsTr" / Path(row["scan"]).name).dataobj)
        assert row["dice"] == pytest.approx(dice(np.asanyarray(mask.dataobj), label), abs=1e-4)
        with Image.open(row["overlay"]) as png:
            assert png.format == "PNG" and png.size[0] > png.size[1]
        assert f"{Path(row['scan']).name}: spleen {row['spleen_ml']} mL, Dice {row['dice']}" in printed


def test_volume_and_dice_by_hand():
    mask = nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.diag([2.0, 2.0, 5.0, 1.0]))
    mask.dataobj[2:4, 2:4, 2:4] = 1  # 8 voxels of 20 mm^3
    assert spleen_volume_ml(mask) == pytest.approx(0.16)
    a, b = np.zeros(10), np.zeros(10)
    a[:4], b[2:6] = 1, 1
    assert dice(a, b) == pytest.approx(0.5) and dice(np.zeros(3), np.zeros(3)) == 1.0


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def test_every_bad_scan_gets_one_line_and_nothing_is_written(bundle, dataset, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    _nifti(scans / "flat.nii.gz", np.zeros((32, 32), np.int16) - 1000)
    _nifti(scans / "normalised.nii.gz", np.random.default_rng(0).random((16, 16, 8)).astype(np.float32))
    good = sorted((dataset / "imagesTr").iterdir())[0]
    (scans / "truncated.nii.gz").write_bytes(gzip.compress(good.read_bytes())[:2000])
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))  # 16 GB declared in a 70-byte file
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    (scans / "bomb.nii.gz").write_bytes(gzip.compress(header.binaryblock + bytes(4)))
    out = tmp_path / "out"
    assert segment_main(["--bundle", str(bundle), "--input", str(scans), "--output", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "bomb.nii.gz: its header declares 2000x2000x2000 int16 voxels" in lines[0]
    assert "flat.nii.gz: a 2D image" in lines[1]
    assert "normalised.nii.gz: intensities" in lines[2] and "Hounsfield" in lines[2]
    assert "truncated.nii.gz: not a readable NIfTI" in lines[3]
    assert not out.exists()


def test_labels_are_checked_before_inference_one_line_each(bundle, dataset, tmp_path, capsys):
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    scans.mkdir()
    labels.mkdir()
    for scan in sorted((dataset / "imagesTr").iterdir()):  # 4 scans: the 2 of the dataset and copies
        for name in (scan.name, f"x_{scan.name}"):
            (scans / name).write_bytes(scan.read_bytes())
            (labels / name).write_bytes((dataset / "labelsTr" / scan.name).read_bytes())
    four_d, twos, cut, _fine = (labels / p.name for p in sorted(scans.iterdir()))
    label = nib.load(four_d)
    values = np.asanyarray(label.dataobj)
    nib.save(nib.Nifti1Image(np.stack([values, values], axis=-1), label.affine), four_d)
    label = nib.load(twos)
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj) * 2, label.affine), twos)  # 0 and 2: not spleen
    cut.write_bytes(cut.read_bytes()[:300])
    out = tmp_path / "out"
    args = ["--bundle", str(bundle), "--input", str(scans), "--output", str(out), "--labels", str(labels)]
    assert segment_main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert lines[0].startswith(f"error: {four_d}: a 4D label of shape")
    assert lines[1].startswith(f"error: {twos}: holds values 0, 2")
    assert lines[2].startswith(f"error: {cut}: not a readable NIfTI")
    assert not out.exists()  # nothing ran, nothing written


def test_not_a_nifti_a_missing_label_and_not_a_bundle(bundle, dataset, tmp_path, capsys):
    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG")
    out = str(tmp_path / "out")
    assert segment_main(["--bundle", str(bundle), "--input", str(png), "--output", out]) == 2
    assert "scan.png: not a NIfTI file" in capsys.readouterr().err
    images = str(dataset / "imagesTr")
    assert segment_main(["--bundle", str(bundle), "--input", images, "--output", out, "--labels", str(tmp_path)]) == 2
    assert "no label named" in capsys.readouterr().err
    assert segment_main(["--bundle", str(tmp_path), "--input", images, "--output", out]) == 2
    err = capsys.readouterr().err
    assert "not a model bundle" in err and "spleen-export" in err


@pytest.mark.parametrize(
    "device, needle",
    [("cuda:7", "--device cuda:7: this machine has"), ("gpu0", "--device gpu0: not a torch device name")],
)
def test_a_device_this_machine_lacks_is_one_line_before_any_work(bundle, dataset, tmp_path, capsys, device, needle):
    out = tmp_path / "out"
    images = str(dataset / "imagesTr")
    assert segment_main(["--bundle", str(bundle), "--input", images, "--output", str(out), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not out.exists()
