"""BundleRunner and the persistor's network on the real bundle with tiny synthetic data."""

from __future__ import annotations

import pytest
import torch

from spleen_flare.bundle_runner import BEST_LOCAL_MODEL, BundleRunner, build_network
from spleen_flare.persistor import weights_digest
from spleen_flare.site_data import load_site_datalist
from spleen_tools.data import make_site_datalists, make_synthetic_dataset
from spleen_tools.paths import BUNDLE_SRC

QUICK = ["configs/train.json", "../overrides/cpu_quick.json"]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    data_dir = make_synthetic_dataset(root / "data", num_train=4, num_test=1, shape=(64, 64, 16), seed=1)
    paths = make_site_datalists(data_dir, num_sites=2)
    training, validation = load_site_datalist(paths["site-1"])
    bundle = root / "bundle"
    import shutil

    shutil.copytree(BUNDLE_SRC, bundle / "spleen_ct_segmentation")
    shutil.copytree(BUNDLE_SRC.parent / "overrides", bundle / "overrides")
    return BundleRunner(bundle / "spleen_ct_segmentation", QUICK, str(data_dir), training, validation)


def test_network_is_seeded_and_full_size():
    first = build_network(BUNDLE_SRC, ["configs/train.json"], seed=0)
    second = build_network(BUNDLE_SRC, ["configs/train.json"], seed=0)
    other = build_network(BUNDLE_SRC, ["configs/train.json"], seed=1)
    assert sum(p.numel() for p in first.parameters()) == 4_808_917
    assert weights_digest(first.state_dict()) == weights_digest(second.state_dict())
    assert weights_digest(first.state_dict()) != weights_digest(other.state_dict())


def test_train_continues_epochs_and_changes_weights(runner):
    before = runner.get_weights()
    steps = runner.train(1)
    assert steps > 0 and runner.global_epoch == 1
    runner.train(1)
    assert runner.global_epoch == 2
    after = runner.get_weights()
    assert weights_digest(before) != weights_digest(after)
    # Local validation ran through the bundle's ValidationHandler and kept the best local model.
    assert (runner.ckpt_dir / BEST_LOCAL_MODEL).is_file()
    assert 0.0 <= runner.best_local_metric <= 1.0


def test_a_resumed_job_counts_epochs_from_where_the_lost_one_was(runner):
    start = runner.global_epoch
    runner.catch_up(start + 4)  # round 2 of 2 local epochs, say, after 2 epochs here
    iterations = int(runner.trainer.state.iteration)
    assert runner.train(1) == len(runner.trainer.data_loader) and runner.global_epoch == start + 5
    assert int(runner.trainer.state.iteration) == iterations + len(runner.trainer.data_loader)
    runner.catch_up(start + 1)  # never backwards
    assert runner.global_epoch == start + 5


def test_evaluating_foreign_weights_restores_local_ones(runner):
    local = runner.get_weights()
    best_before = runner.best_local_metric
    foreign = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in local.items()}
    metrics = runner.evaluate(foreign)
    assert "val_mean_dice" in metrics
    assert weights_digest(runner.get_weights()) == weights_digest(local)
    assert runner.best_local_metric == best_before


def test_best_local_weights_are_those_of_the_best_validation_not_the_current_ones(runner):
    runner.best_local_metric = -1.0  # sets its own state: the next local validation is the best so far
    runner.evaluate()  # local validation: the bundle's handler keeps these weights as the best local model
    kept = runner.get_weights()
    runner.set_weights({k: v + 1.0 if v.is_floating_point() else v for k, v in kept.items()})
    got = runner.best_local_weights()
    assert got.keys() == kept.keys() and all(torch.equal(got[k], kept[k]) for k in kept)
    current = runner.get_weights()
    assert not all(torch.equal(got[k], current[k]) for k in current)


def test_fedbn_keeps_the_sites_batchnorm_layers(runner):
    """FedBN: the BatchNorm layers' weights and running statistics stay the site's when a global model is loaded
    or scored; every other weight is the received one."""
    keys = runner.norm_keys()
    local = runner.get_weights()
    batchnorms = [m for m in runner.network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert batchnorms and len(keys) == 5 * len(batchnorms)  # weight, bias, running mean and var, batches tracked
    assert {k.rsplit(".", 1)[1] for k in keys} == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    received = {k: v + 1.0 if v.is_floating_point() else v + 1 for k, v in local.items()}
    runner.evaluate(received, keep=keys)
    assert all(torch.equal(runner.get_weights()[k], local[k]) for k in local), "scoring restores every weight"
    runner.set_weights(received, keep=keys)
    now = runner.get_weights()
    assert all(torch.equal(now[k], local[k] if k in keys else received[k]) for k in local)
    runner.set_weights(local)


def test_fedprox_adds_mu_half_the_squared_distance_from_the_rounds_global_model(tmp_path):
    """The training loss with FedProx is the bundle's loss plus mu/2 x ||w - w_global||^2 (NVFlare's PTFedProxLoss),
    measured on the real trainer's loss function after moving the weights a known distance."""
    data_dir = make_synthetic_dataset(tmp_path / "data", num_train=2, num_test=0, shape=(48, 48, 12), seed=2)
    training, validation = load_site_datalist(make_site_datalists(data_dir, num_sites=1)["site-1"])
    import shutil

    shutil.copytree(BUNDLE_SRC, tmp_path / "bundle" / "spleen_ct_segmentation")
    shutil.copytree(BUNDLE_SRC.parent / "overrides", tmp_path / "bundle" / "overrides")
    runner = BundleRunner(tmp_path / "bundle" / "spleen_ct_segmentation", QUICK, str(data_dir), training, validation)
    bundle_loss = runner.trainer.loss_function
    runner.use_fedprox(mu=0.5)
    runner.anchor_to_current()
    pred, label = torch.rand(1, 2, 8, 8, 8), torch.randint(0, 2, (1, 1, 8, 8, 8)).float()
    assert runner.trainer.loss_function(pred, label).item() == pytest.approx(bundle_loss(pred, label).item())
    with torch.no_grad():
        for parameter in runner.network.parameters():
            parameter.add_(0.01)  # every parameter moved by 0.01: squared distance = 1e-4 x parameter count
    count = sum(p.numel() for p in runner.network.parameters())
    extra = runner.trainer.loss_function(pred, label).item() - bundle_loss(pred, label).item()
    assert extra == pytest.approx(0.5 / 2 * 1e-4 * count, rel=1e-3)
    runner.anchor_to_current()  # the next round's global model: no distance left
    assert runner.trainer.loss_function(pred, label).item() == pytest.approx(bundle_loss(pred, label).item())
