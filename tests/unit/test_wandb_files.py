"""Offline W&B runs, written by wandb itself, read back point by point; damaged or crafted run files are one
error naming the file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spleen_flare.contract import WANDB_FOLDER
from spleen_tools.run.wandb_files import (
    BLOCK,
    MAX_RUN_FILE,
    WandbFileError,
    read_records,
    read_run,
    run_files,
    series,
    sync_command,
    wandb_curves,
)

ITERATIONS = 3000  # enough rows to span several 32 KiB blocks, so records cross block borders


def _write_run(folder: Path, name: str) -> None:
    """A run as JobWandBReceiver logs it: each metric with its own ``<metric>_step`` axis, steps out of order."""
    script = textwrap.dedent(
        f"""
        import wandb
        run = wandb.init(project="p", name={name!r}, dir={str(folder)!r}, mode="offline",
                         config={{"note": "x" * 40000}})
        for m in ("train_loss", "val_mean_dice"):
            run.define_metric(m, step_metric=m + "_step")
        for i in range(1, {ITERATIONS} + 1):
            run.log({{"train_loss": 1.0 / i, "train_loss_step": i}})
        for epoch in (1, 2):
            run.log({{"val_mean_dice": 0.4 * epoch, "val_mean_dice_step": epoch}})
        run.finish()
        """
    )
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job") / "job_result" / "workspace"
    for site in ("site-1", "site-2"):
        _write_run(root / WANDB_FOLDER, f"{site}-abc-spleen")
    _write_run(root / "elsewhere", "site-3-abc-spleen")  # outside the receiver's folder: not the job's
    return root.parent


def test_every_point_comes_back_on_its_own_axis(job):
    files = run_files(job, ["site-1", "site-2", "site-3"])
    assert sorted(files) == ["site-1", "site-2"]
    assert Path(files["site-1"]).stat().st_size > 2 * BLOCK  # records did cross block borders
    curves = wandb_curves(files, ("train_loss", "val_mean_dice", "absent"))
    for site in ("site-1", "site-2"):
        loss = curves[site]["train_loss"]
        assert [s for s, _ in loss] == list(range(1, ITERATIONS + 1)) and loss[-1][1] == pytest.approx(1 / ITERATIONS)
        assert curves[site]["val_mean_dice"] == [(1, pytest.approx(0.4)), (2, pytest.approx(0.8))]
        assert curves[site]["absent"] == []


def test_the_sync_command_names_each_run_folder(job):
    files = run_files(job, ["site-1", "site-2"])
    command = sync_command(files)
    assert command.startswith(".venv/bin/wandb sync ")
    assert all(str(Path(p).parent) in command for p in files.values())


def test_a_metric_without_its_own_axis_uses_the_run_step():
    rows = [{"_step": 4, "loss": 1.0}, {"_step": 5, "loss": 0.5, "loss_step": 9}]
    assert series(rows, ("loss",)) == {"loss": [(4, 1.0), (9, 0.5)]}


def _damaged(job: Path, tmp_path: Path, edit) -> Path:
    data = bytearray(Path(run_files(job, ["site-1"])["site-1"]).read_bytes())
    edit(data)
    path = tmp_path / "run-x.wandb"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: d.__setitem__(slice(0, 4), b"PK\x03\x04"), "not a W&B run file"),
        (lambda d: d.__setitem__(40, d[40] ^ 0xFF), "checksum mismatch"),
        (lambda d: d.__setitem__(slice(11, 13), b"\xff\xff"), "damaged chunk"),  # past its block
        (lambda d: d.__setitem__(13, 9), "damaged chunk"),
        (lambda d: d.__delitem__(slice(BLOCK + 100, None)), "damaged chunk"),
    ],
    ids=["header", "checksum", "length", "kind", "truncated"],
)
def test_a_damaged_run_file_is_one_error_naming_it(job, tmp_path, edit, says):
    path = _damaged(job, tmp_path, edit)
    with pytest.raises(WandbFileError, match=says) as caught:
        read_run(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "run-big.wandb"
    with path.open("wb") as f:
        f.truncate(MAX_RUN_FILE + 1)  # sparse: nothing is written
    with pytest.raises(WandbFileError, match="more than a run file"):
        read_records(path)


def test_a_record_that_is_no_protobuf_is_named(tmp_path):
    import struct
    import zlib

    body = b"\xff" * 50
    checksum = zlib.crc32(body, zlib.crc32(bytes([1]))) & 0xFFFFFFFF
    path = tmp_path / "run-junk.wandb"
    path.write_bytes(struct.pack("<4sHB", b":W&B", 0xBEE1, 0) + struct.pack("<IHB", checksum, len(body), 1) + body)
    with pytest.raises(WandbFileError, match="cannot parse"):
        read_run(path)
