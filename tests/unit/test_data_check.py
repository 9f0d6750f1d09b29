"""A site's own check of its cases (``spleen_flare.data_check``, run by ``client_train`` at job start), and how its
lines reach the one command: a ``data_error`` progress line per problem, collected, printed first as the cause."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_flare import data_check
from spleen_flare.client_train import SiteDataError, check_site_cases
from spleen_flare.data_check import case_problems, image_problem, label_problem
from spleen_tools.data.synthetic import make_synthetic_dataset
from spleen_tools.flare import TERMINAL_OK
from spleen_tools.run.progress import Progress, parse_event
from spleen_tools.run.summary import RunSummary, problems


@pytest.fixture
def cases(tmp_path) -> list[dict]:
    data = make_synthetic_dataset(tmp_path / "data", num_train=3, num_test=0, shape=(24, 24, 8))
    training = json.loads((data / "dataset.json").read_text())["training"]
    return [{k: str((data / c[k]).resolve()) for k in ("image", "label")} for c in training]


def test_good_cases_pass_and_each_bad_one_is_a_line(cases):
    assert case_problems(cases) == []
    short = Path(cases[0]["label"])
    label = nib.load(short)
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj)[:-5], label.affine), short)  # 5 voxels short along x
    twos = Path(cases[1]["label"])
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(twos).dataobj) * 2, nib.load(twos).affine), twos)
    cut = Path(cases[2]["image"])
    cut.write_bytes(cut.read_bytes()[:200])  # truncated: its label is not read
    found = case_problems(cases)
    assert len(found) == 3
    shape = tuple(nib.load(cases[0]["image"]).shape)
    assert found[0].startswith(f"{short}: shape {(shape[0] - 5, *shape[1:])} differs from its image's {shape}")
    assert found[1].startswith(f"{twos}: holds values 0, 2") and "0 and 1 only" in found[1]
    assert found[2].startswith(f"{cut}: not a readable NIfTI")


def test_a_site_prints_every_problem_then_stops(cases, capsys):
    check_site_cases("site-1", cases)  # fine: nothing printed
    assert capsys.readouterr().out == ""
    bad = Path(cases[1]["label"])
    label = nib.load(bad)
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj).astype(np.int16) * 255, label.affine), bad)  # 0/255
    with pytest.raises(SiteDataError, match=r"site-1: 1 problem\(s\)"):
        check_site_cases("site-1", cases)
    lines = capsys.readouterr().out.splitlines()
    events = [parse_event(line) for line in lines]
    assert len(events) == 1 and events[0]["kind"] == "data_error" and events[0]["site"] == "site-1"
    assert events[0]["problem"].startswith(f"{bad}: holds values")

    # the one command: the line as it arrives (twice: site log and job log), then the run's verdict
    progress = Progress(["site-1", "site-2"], 1)
    printed = progress.add(events[0]) + progress.add(dict(events[0]))
    assert len(printed) == 1 and printed[0].endswith(f"site-1: {events[0]['problem']}")
    summary = RunSummary(status="FINISHED:EXECUTION_EXCEPTION", data_errors=progress.data_errors)
    assert problems(summary, ["site-1", "site-2"], TERMINAL_OK) == [
        f"site-1: {events[0]['problem']}",
        "job ended FINISHED:EXECUTION_EXCEPTION",
        "no cross-site results in the downloaded job",
    ]


def _hand_written(path: Path, shape: tuple[int, ...], body: bytes = b"", extension: int | None = None) -> Path:
    """A NIfTI-1 file from a header written by hand (int16, 1 mm voxels) and ``body`` as its voxels: it may declare
    far more than it holds. ``extension``: one header extension whose size field says this many bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352 if extension is None else 368
    flag = b"\0\0\0\0" if extension is None else b"\1\0\0\0" + np.array([extension, 0], "<i4").tobytes() + bytes(8)
    raw = header.binaryblock + flag + body
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def test_a_header_declaring_more_than_a_ct_is_refused_before_any_read(tmp_path):
    bomb = _hand_written(tmp_path / "bomb.nii.gz", (2048, 2048, 256))  # 1.07 G voxels in 77 bytes
    (problem,) = case_problems([{"image": str(bomb)}])
    assert problem.startswith(f"{bomb}: its header declares 2048x2048x256 int16 voxels (1074 M, 2.1 GB)")
    assert "MAX_VOXELS" in problem and "\n" not in problem
    short = _hand_written(tmp_path / "short.nii", (512, 512, 400), body=bytes(1000))  # uncompressed: must fit
    assert image_problem(short).startswith(f"{short}: its header declares 209,715,552 bytes")


@pytest.mark.parametrize("size", [2**20, -64])
def test_a_header_extension_running_past_the_voxels_is_refused(tmp_path, size):
    bomb = _hand_written(tmp_path / "ext.nii.gz", (8, 8, 8), body=bytes(1024), extension=size)
    assert image_problem(bomb).startswith(f"{bomb}: a header extension of {size} bytes at byte 352 does not end")


def test_voxels_are_read_in_chunks_and_every_chunk_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(data_check, "CHUNK_VOXELS", 100)  # 24x24x8 voxels: 47 chunks
    scan = np.full((24, 24, 8), -1000, np.int16)
    scan[-1, -1, -1] = 400  # tissue in the last chunk only
    nib.save(nib.Nifti1Image(scan, np.eye(4)), tmp_path / "ct.nii.gz")
    assert image_problem(tmp_path / "ct.nii.gz") is None
    scaled = nib.Nifti1Image(scan, np.eye(4))
    scaled.header.set_slope_inter(0.1, 0)  # scaled on read, chunk by chunk: -100 and 40
    nib.save(scaled, tmp_path / "halved.nii.gz")
    assert "intensities -100..40 do not" in image_problem(tmp_path / "halved.nii.gz")
    label = np.zeros_like(scan, np.uint8)
    label[-1, -1, -1] = 2
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "label.nii.gz")
    assert label_problem(tmp_path / "label.nii.gz", tmp_path / "ct.nii.gz").endswith(
        "values 0, 2; a spleen label holds 0 and 1 only"
    )


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nan_or_infinite_voxels_are_refused(tmp_path, bad):
    scan = np.full((16, 16, 6), -1000.0, np.float32)
    scan[8:, :, :] = 50.0
    scan[3, 4, 5] = bad
    nib.save(nib.Nifti1Image(scan, np.eye(4)), tmp_path / "ct.nii.gz")
    problem = image_problem(tmp_path / "ct.nii.gz")
    assert problem == (
        f"{tmp_path / 'ct.nii.gz'}: 1 voxels are NaN or infinite; a CT holds finite Hounsfield units: fix the"
        " conversion that wrote it (or set those voxels to air, -1024)"
    )


def test_a_4d_label_and_malformed_entries_are_one_line_each(cases):
    label = Path(cases[0]["label"])
    values = np.asanyarray(nib.load(label).dataobj)
    nib.save(nib.Nifti1Image(np.stack([values, values], axis=-1), nib.load(label).affine), label)
    found = case_problems([cases[0], {"label": cases[1]["label"]}, cases[1]["image"], cases[2]])
    assert len(found) == 3
    assert found[0].startswith(f"{label}: a 4D label of shape") and "one 3D volume" in found[0]
    assert found[1].startswith("datalist entry {'label': ") and "fix the datalist" in found[1]
    assert found[2].startswith("datalist entry '/") and "is not {'image': path, 'label': path}" in found[2]
