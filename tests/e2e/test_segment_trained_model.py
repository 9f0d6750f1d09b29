"""A model trained on synthetic scans, exported and verified as a bundle, segments a held-out scan of the kind.

Training is the bundle itself (the validity study's centralized arm, CPU-quick settings), not NVFlare: what is
tested here is export -> verify -> TorchScript == state dict -> spleen-segment on a scan whose spleen is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spleen_tools.bench.arms import CONFIG_FILES, make_runner
from spleen_tools.cli.segment import main as segment_main
from spleen_tools.data.synthetic import make_synthetic_dataset
from spleen_tools.model_bundle import ModelSource, export_bundle, verify_bundle
from spleen_tools.segment.measures import geometry_problem

EPOCHS = 15  # centralized on 7 synthetic cases: Dice passes 0.8 after about 8 epochs


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("train")
    data = make_synthetic_dataset(work / "data", num_train=9, num_test=0, seed=3)
    cases = [{"image": str(p), "label": str(data / "labelsTr" / p.name)} for p in sorted((data / "imagesTr").iterdir())]
    runner = make_runner(work, data, cases[:7], cases[7:])
    runner.train(EPOCHS)
    checkpoint = work / "model.pt"
    torch.save(runner.get_weights(), checkpoint)
    source = ModelSource(checkpoint, bundle=runner.bundle_root, train_configs=tuple(CONFIG_FILES), sites=["central"])
    bundle = export_bundle(source, work / "export")
    return {"bundle": bundle, "held_out": cases[7:], "data": data, "validation_dice": runner.last_local_metric}


def test_exported_bundle_verifies(trained):
    assert trained["validation_dice"] >= 0.8, "the bundle did not learn the synthetic spleen"
    assert verify_bundle(trained["bundle"])["torchscript_max_abs_diff"] <= 1e-4


def test_segmenting_held_out_scans_finds_the_known_spleen(trained, tmp_path):
    scans, labels, out = tmp_path / "scans", tmp_path / "labels", tmp_path / "out"
    scans.mkdir()
    labels.mkdir()
    for case in trained["held_out"]:
        (scans / Path(case["image"]).name).symlink_to(case["image"])
        (labels / Path(case["label"]).name).symlink_to(case["label"])
    args = ["--bundle", str(trained["bundle"]), "--input", str(scans), "--output", str(out), "--labels", str(labels)]
    assert segment_main(args) == 0
    rows = json.loads((out / "segmentation.json").read_text())["scans"]
    assert len(rows) == 2
    for row in rows:
        assert geometry_problem(nib.load(row["mask"]), nib.load(row["scan"]), Path(row["mask"])) is None
        label = nib.load(labels / Path(row["scan"]).name)
        truth_ml = np.count_nonzero(np.asanyarray(label.dataobj)) * abs(np.linalg.det(label.affine[:3, :3])) / 1000
        assert row["dice"] >= 0.8, row
        assert row["spleen_ml"] == pytest.approx(truth_ml, rel=0.3), row
