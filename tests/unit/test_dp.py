"""DP-SGD at a site (spleen_flare.dp) in the real bundle trainer with tiny synthetic data, and its accounting
checked against Opacus's own RDP analysis computed independently."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from tiny_site import QUICK, tiny_site

from spleen_flare.bundle_runner import BundleRunner
from spleen_flare.contract import DP_MAX_DELTA_ENV, DP_MAX_EPSILON_ENV, DP_OVERRIDE_FILE
from spleen_flare.dp import EMPTY_DRAW, DPBudgetSpent, DPError, DPSettings, with_site_limits
from spleen_flare.persistor import weights_digest

DP_CONFIGS = [*QUICK, DP_OVERRIDE_FILE]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return tiny_site(tmp_path_factory.mktemp("dp"), num_train=4, shape=(48, 48, 16))


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    eps, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), delta=delta
    )
    return float(eps)


def test_dp_training_counts_every_draw_and_matches_opacus(site):
    bundle, data_dir, training, validation = site
    settings = DPSettings(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    runner = BundleRunner(bundle, DP_CONFIGS, data_dir, training, validation, dp=settings)
    privacy = runner.privacy
    assert privacy.sample_rate == pytest.approx(1 / len(training))  # batch 1 case of the site's cases
    assert runner.dp_changes == ["RandCropByPosNegLabeld num_samples 2 -> 1"]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in runner.network.modules())
    before = runner.get_weights()
    runner.train(1)
    # every draw is a step, empty ones too: the count is fixed, never data-dependent
    assert privacy.steps == privacy.steps_per_epoch == len(training)
    weights, draws = runner.get_weights(), privacy.empty_draws
    trainer = runner.trainer
    output = trainer._process_function(trainer, {EMPTY_DRAW: True})  # a draw with no case: a step of noise only
    assert privacy.steps == len(training) + 1 and privacy.empty_draws == draws + 1
    assert weights_digest(weights) != weights_digest(runner.get_weights())
    assert output and "loss" in output[0]  # the handlers see the last real batch's (decollated) output again
    assert weights_digest(before) != weights_digest(runner.get_weights())
    expected = opacus_epsilon(1.1, privacy.sample_rate, privacy.steps, 1e-5)
    assert privacy.epsilon() == pytest.approx(expected, rel=1e-6)
    assert privacy.epsilon(10) == pytest.approx(opacus_epsilon(1.1, privacy.sample_rate, privacy.steps + 10, 1e-5))
    report = privacy.report()
    assert report["dp_steps"] == privacy.steps and report["dp_epsilon"] == pytest.approx(expected)


def test_target_epsilon_plans_the_noise_and_the_budget_stops_the_site(site):
    bundle, data_dir, training, validation = site
    runner = BundleRunner(
        bundle, DP_CONFIGS, data_dir, training, validation, dp=DPSettings(target_epsilon=8.0, delta=1e-5)
    )
    privacy = runner.privacy
    per_round = privacy.steps_per_epoch
    privacy.plan(3 * per_round)  # three rounds of one epoch
    assert opacus_epsilon(privacy.noise_multiplier, privacy.sample_rate, 3 * per_round, 1e-5) == pytest.approx(
        8.0, 0.01
    )
    for rnd in range(3):  # the accountant as the optimizer's hook counts a round's steps (training: the test above)
        assert privacy.check_budget(per_round, "site-1", rnd) <= 8.0
        privacy.accountant.history.append((privacy.noise_multiplier, privacy.sample_rate, per_round))
    with pytest.raises(DPBudgetSpent, match=r"site-1 stops before round 4: epsilon would reach .* > its budget 8"):
        privacy.check_budget(per_round, "site-1", 3)


def test_batchnorm_and_a_pooled_loss_are_refused_with_the_fix(site):
    bundle, data_dir, training, validation = site
    with pytest.raises(DPError, match=r"loss#batch true\): add \.\./overrides/dp\.json"):
        BundleRunner(bundle, QUICK, data_dir, training, validation, dp=DPSettings(noise_multiplier=1.0))


def test_site_limits_win_over_the_job():
    job = DPSettings(target_epsilon=30.0, delta=1e-3)
    site = with_site_limits(job, "site-1", {DP_MAX_EPSILON_ENV: "8", DP_MAX_DELTA_ENV: "1e-5"})
    assert site.max_epsilon == 8.0 and site.delta == 1e-5 and site.target_epsilon == 30.0
    assert with_site_limits(job, "site-1", {}) is job
    with pytest.raises(DPError, match=r"site-1 trains only with differential privacy .*--dp"):
        with_site_limits(None, "site-1", {DP_MAX_EPSILON_ENV: "8"})
    with pytest.raises(DPError, match="must be numbers"):
        with_site_limits(job, "site-1", {DP_MAX_EPSILON_ENV: "eight"})
    with pytest.raises(DPError, match="exactly one of"):
        DPSettings(noise_multiplier=1.0, target_epsilon=8.0)
    with pytest.raises(DPError, match="delta must be in"):
        DPSettings(noise_multiplier=1.0, delta=0.0)
