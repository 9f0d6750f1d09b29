"""A downloaded job's global model exported as a MONAI bundle, verified, and run by the bundle's own inference."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from model_jobs import JOB_ID, make_downloaded_job

from spleen_tools.cli.export_model import main as export_main
from spleen_tools.model_bundle import (
    ExportError,
    export_bundle,
    find_job,
    source_from_job,
    verify_bundle,
)
from spleen_tools.paths import BUNDLE_SRC


@pytest.fixture(scope="module")
def downloaded_job(tmp_path_factory) -> Path:
    return make_downloaded_job(tmp_path_factory.mktemp("job_result"))


@pytest.fixture(scope="module")
def exported(downloaded_job: Path, tmp_path_factory) -> Path:
    return export_bundle(source_from_job(downloaded_job), tmp_path_factory.mktemp("export"))


def test_source_names_job_rounds_sites_and_dice(downloaded_job: Path) -> None:
    final = source_from_job(find_job(downloaded_job.parent))  # job_result/ holds the one job
    assert (final.job_id, final.rounds, final.sites, final.model_round) == (JOB_ID, 3, ["site-1", "site-2"], 2)
    assert final.dice == {"site-1": 0.9, "site-2": 0.8}
    best = source_from_job(downloaded_job, "best")
    assert best.checkpoint.name == "best_FL_global_model.pt" and best.model_round == 1


def test_the_bundle_is_the_jobs_with_the_roi_the_sites_trained_with(
    exported: Path, downloaded_job: Path, tmp_path: Path
) -> None:
    assert source_from_job(downloaded_job).bundle.is_relative_to(downloaded_job / "job")
    inference = json.loads((exported / "configs" / "inference.json").read_text())
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    assert inference["roi_size"] == [48, 48, 48]  # the job trained with the CPU-quick override
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [48, 48, 48]
    assert "inference ROI 48x48x48 as trained" in meta["changelog"][meta["version"]]
    plain = source_from_job(make_downloaded_job(tmp_path, with_job_definition=False))
    assert plain.bundle == BUNDLE_SRC and plain.train_configs == ("configs/train.json",)


def test_exported_bundle_verifies_and_torchscript_equals_state_dict(exported: Path) -> None:
    checked = verify_bundle(exported)
    assert checked["torchscript_max_abs_diff"] <= 1e-4
    assert {p.name for p in (exported / "models").iterdir()} == {"model.pt", "model.ts"}


def test_metadata_has_new_version_changelog_dice_and_provenance(exported: Path) -> None:
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    shipped = json.loads((BUNDLE_SRC / "configs" / "metadata.json").read_text())
    assert meta["version"] != shipped["version"] and meta["version"] in meta["changelog"]
    assert JOB_ID in meta["changelog"][meta["version"]]
    assert meta["eval_metrics"]["mean_dice"] == pytest.approx(0.85)
    provenance = meta["federated_training"]
    assert provenance["job_id"] == JOB_ID and provenance["model"] == "final" and provenance["rounds"] == 3
    assert provenance["cross_site_dice"] == {"site-1": 0.9, "site-2": 0.8}


def _job_weights(job: Path, name: str) -> dict[str, torch.Tensor]:
    """The server's checkpoint as NVFlare's PT persistor wrote it, read with torch alone (not the exporter's reader)."""
    return torch.load(job / "workspace" / "app_server" / name, map_location="cpu", weights_only=True)["model"]


def test_model_pt_is_the_plain_state_dict_of_the_global_model(exported: Path, downloaded_job: Path) -> None:
    saved = torch.load(exported / "models" / "model.pt", map_location="cpu", weights_only=True)
    original = _job_weights(downloaded_job, "FL_global_model.pt")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)


def test_exporting_the_best_model_exports_its_weights_not_the_final_ones(downloaded_job: Path, tmp_path: Path) -> None:
    bundle = export_bundle(source_from_job(downloaded_job, "best"), tmp_path)
    saved = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    best, final = (_job_weights(downloaded_job, n) for n in ("best_FL_global_model.pt", "FL_global_model.pt"))
    assert all(torch.equal(saved[k], best[k]) for k in best)
    assert not all(torch.equal(saved[k], final[k]) for k in final)
    assert verify_bundle(bundle)["torchscript_max_abs_diff"] <= 1e-4


def test_the_bundles_own_inference_config_loads_the_exported_model(exported: Path, tmp_path: Path) -> None:
    image = tmp_path / "data" / "imagesTs" / "case.nii.gz"
    image.parent.mkdir(parents=True)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    volume = np.random.default_rng(0).integers(-100, 200, size=(40, 40, 12)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), image)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(exported / "configs" / "inference.json")]
    cmd += ["--bundle_root", str(exported), "--dataset_dir", str(image.parent.parent), "--output_dir", str(tmp_path)]
    cmd += ["--roi_size", "[48,48,48]", "--dataloader#num_workers", "0"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (mask,) = (tmp_path / "case").glob("*.nii.gz")
    assert nib.load(mask).shape == volume.shape


def test_a_tampered_torchscript_model_fails_verification(exported: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    weights = torch.load(copy / "models" / "model.pt", map_location="cpu", weights_only=True)
    weights = {k: v + 0.5 if v.is_floating_point() else v for k, v in weights.items()}
    torch.save(weights, copy / "models" / "model.pt")
    with pytest.raises(ExportError, match="model.ts differs from model.pt"):
        verify_bundle(copy)


def test_not_a_checkpoint_is_one_clear_error(tmp_path: Path, capsys) -> None:
    job = tmp_path / "job"
    (job / "workspace" / "app_server").mkdir(parents=True)
    (job / "workspace" / "app_server" / "FL_global_model.pt").write_text("not a checkpoint")
    assert export_main([str(job), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "FL_global_model.pt" in err and "\n" not in err


def test_a_folder_without_a_job_is_one_clear_error(tmp_path: Path, capsys) -> None:
    assert export_main([str(tmp_path)]) == 2
    assert "no downloaded job" in capsys.readouterr().err


class TouchOnLoad:
    """Unpickled, this calls ``Path.touch(marker)``: a crafted checkpoint's ``os.system``, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("layout", ["torch_zip", "raw_pickle"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(
    downloaded_job: Path, tmp_path: Path, capsys, layout: str
) -> None:
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "FL_global_model.pt"
    payload = {"model": {"w": torch.zeros(2)}, "train_conf": TouchOnLoad(marker)}
    if layout == "torch_zip":
        torch.save(payload, crafted)
    else:
        crafted.write_bytes(pickle.dumps(payload))
    out = tmp_path / "out"
    assert export_main([str(downloaded_job), "--checkpoint", str(crafted), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {crafted}: refused") and "\n" not in err
    assert not marker.exists() and not out.exists()
    if layout == "raw_pickle":  # the file is a real payload: plain unpickling runs it
        pickle.loads(crafted.read_bytes())
        assert marker.exists()
