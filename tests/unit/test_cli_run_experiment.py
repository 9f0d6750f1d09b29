"""The one command's command line: bad input is one line, exit 2, and leaves nothing behind."""

from __future__ import annotations

import json
import re

import pytest

from spleen_tools.cli import bench as bench_cli
from spleen_tools.cli import run_experiment as cli


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--sites", "0"], "--sites must be at least 1"),
        (["--local-epochs", "-1"], "--local-epochs must be at least 1"),
        (["--rounds", "two"], "invalid int value"),
        (["--job", "fancy"], "invalid choice"),
        (["--synthetic-shape", "9x9"], "expected three sizes"),
        (["--synthetic-cases", "3"], "too few for 2 sites"),
        (["--min-clients", "3"], "--min-clients must be between 1 and --sites 2"),
        (["--site-timeout", "0"], "--site-timeout must be at least 1 s"),
        (["--max-resumes", "-1"], "--max-resumes must be 0 or more"),
        (["--data", "/nonexistent/Task09_Spleen"], "no dataset.json"),
        (["--no-such-option"], "unrecognized arguments"),
        (["--stop", "/nonexistent/run"], "no pids.json"),
        (["--gpus", "zero"], "GPU ids as integers, comma-separated"),
        (["--gpus", "0,0,0"], "give one GPU id for all sites or one per site (2)"),
        (["--gpus", "-1"], "GPU ids are 0 or more"),
        (["--gpus", "99"], "this machine has"),
        (["--dp", "8", "--dp-noise", "1"], "a target epsilon (--dp EPSILON) or a noise multiplier"),
        (["--dp", "0"], "DP target epsilon must be positive, got 0.0"),
        (["--dp", "8", "--dp-clip", "-1"], "DP max grad norm must be positive"),
        (["--dp", "8", "--dp-delta", "1"], "DP delta must be below 1"),
        (["--dp", "8", "--algorithm", "fedprox"], "--dp with --algorithm fedprox: the proximal term's gradient"),
        (["--dp", "8", "--algorithm", "fedbn"], "--dp with --algorithm fedbn: FedBN keeps BatchNorm layers"),
        (["--dp", "8", "--job", "stats"], "--dp is for the training jobs (local, he), not --job stats"),
        (["--dp", "eight"], "invalid float value"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(cli.main([*argv, "--quick", "--runs-dir", str(tmp_path)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not any(tmp_path.iterdir()), "bad input must not make a run directory"


def test_he_job_missing_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("spleen_tools.run.settings.JOBS_DIR", tmp_path / "jobs")
    assert cli.main(["--job", "he", "--quick", "--runs-dir", str(tmp_path)]) == 2
    assert "spleen_ct_segmentation_he not found" in capsys.readouterr().err


def test_secure_not_provisioned_is_exit_2_before_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPLEEN_SECURE_WORKSPACE", str(tmp_path / "nothing"))
    assert cli.main(["--secure", "--quick", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "provision it first (./start_fl_secure.sh provision)" in err, err
    assert not (tmp_path / "runs" / "latest").exists(), "a refused run must not take runs/latest"
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert not (run_dir / "mlflow").exists(), "no MLflow started before the check"
    stopped = (run_dir / "stopped.json").read_text()  # the run says where it stopped
    assert json.loads(stopped)["phase"] == "checking that the FL system can start", stopped
    assert json.loads(stopped)["reason"].startswith("SettingsError: no secure workspace at "), stopped


def test_given_data_is_checked_before_any_run_directory(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from spleen_tools.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_train=4, num_test=0, shape=(32, 32, 10))
    label = sorted((data / "labelsTr").iterdir())[0]
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-5], img.affine), label)  # 5 voxels short along x
    runs = tmp_path / "runs"
    assert cli.main(["--data", str(data), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {label}: shape") and "differs from its image" in err[0]
    assert not runs.exists()  # nothing made, nothing started


@pytest.mark.parametrize("command", ["run_experiment", "bench"])
def test_help_says_each_default_once_and_never_none(command, capsys):
    module = {"run_experiment": cli, "bench": bench_cli}[command]
    argv = ["--help"] if command == "run_experiment" else ["validity", "--help"]
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text, text
    options = re.split(r" (?=--[a-z])", text)
    assert [o for o in options if len(re.findall(r"\(default", o)) > 1] == [], text
    assert "(default: 10)" in text or "(default 10" in text  # a real default is still said
