"""A site's data that fails at run time (real deployments: the host cannot read the sites' data, so the one command
cannot check it first; here ``--skip-data-check`` stands for that) makes the one command print that site's line
(site, file, reason) ahead of the job's status, soon after the job starts, and leave nothing running."""

from __future__ import annotations

import json
import os
import subprocess
import time

import nibabel as nib
import numpy as np
from conftest import REPO_ROOT, assert_nothing_left, runner_cmd

from spleen_tools.data.synthetic import make_synthetic_dataset


def test_a_sites_bad_label_is_named_by_the_one_command(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_train=8, num_test=0, shape=(64, 64, 16))
    label = (data / json.loads((data / "dataset.json").read_text())["training"][0]["label"]).resolve()
    volume = nib.load(label)
    nib.save(nib.Nifti1Image(np.asanyarray(volume.dataobj)[:-5], volume.affine), label)  # 5 voxels short along x

    runs = tmp_path / "runs"
    cmd = runner_cmd(runs, "--data", str(data), "--skip-data-check", "--rounds", "1", "--tracking", "workspace")
    t0 = time.monotonic()
    proc = subprocess.run(
        [*cmd, "--timeout", "400"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=500,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    seconds = time.monotonic() - t0
    run_dir = (runs / "latest").resolve()
    owner = next(
        p.stem for p in sorted((run_dir / "datalists").glob("site-*.json")) if str(label) in p.read_text()
    )  # the site whose datalist holds the damaged case
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    print(f"site data error reported after {seconds:.0f} s: {errors[:1]}")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr
    assert errors[0].startswith(f"error: {owner}: {label}: shape "), errors
    assert "differs from its image's" in errors[0] and "use the label made for" in errors[0]
    assert any("job ended" in line for line in errors[1:]), errors  # the job's status follows the cause
    assert f"{owner}: {label}: shape" in proc.stdout  # printed as it arrived, too
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_errors"] == [errors[0].removeprefix("error: ")]
    assert_nothing_left(run_dir)
