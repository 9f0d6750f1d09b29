"""FedOpt's shareable generator on the bundle's network, driven as NVFlare's server drives it (real FLContext,
DXO and model learnables): the optimizer steps from the current global model, BatchNorm statistics are averaged."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from spleen_flare.bundle_runner import build_network
from spleen_flare.fedopt import BundleFedOptShareableGenerator
from spleen_tools.paths import BUNDLE_SRC


@pytest.fixture(scope="module")
def app_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedopt") / "app"
    shutil.copytree(BUNDLE_SRC, root / "config" / "spleen_ct_segmentation")
    return root


def started(app_root, **args) -> tuple[BundleFedOptShareableGenerator, FLContext]:
    generator = BundleFedOptShareableGenerator(**args)
    ctx = FLContext()
    ctx.set_prop(FLContextKey.APP_ROOT, str(app_root), private=True, sticky=False)
    generator.handle_event(EventType.START_RUN, ctx)
    return generator, ctx


def step(generator, ctx, global_weights: dict, diff: dict) -> dict:
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(global_weights, {}), private=True, sticky=False)
    return generator.shareable_to_learnable(DXO(DataKind.WEIGHT_DIFF, diff).to_shareable(), ctx)[
        ModelLearnableKey.WEIGHTS
    ]


def test_sgd_with_momentum_steps_from_the_global_model_and_averages_batchnorm_statistics(app_root):
    generator, ctx = started(app_root, optimizer="sgd", lr=1.0, momentum=0.5)
    network = build_network(BUNDLE_SRC, ["configs/train.json"], seed=3)  # not the generator's own start
    params = {name for name, _ in network.named_parameters()}
    w0 = {k: v.numpy().copy() for k, v in network.state_dict().items()}
    rng = np.random.default_rng(0)
    d1 = {k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in w0.items() if v.dtype == np.float32}
    w1 = step(generator, ctx, w0, d1)
    for key, diff in d1.items():  # first step: momentum buffer = the update; BN statistics: plain FedAvg
        np.testing.assert_allclose(np.asarray(w1[key]), w0[key] + diff, rtol=0, atol=1e-6)
    d2 = {k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in d1.items()}
    w2 = step(generator, ctx, {k: np.asarray(v) for k, v in w1.items()}, d2)
    for key in d2:
        momentum = 0.5 * d1[key] if key in params else 0.0
        np.testing.assert_allclose(np.asarray(w2[key]), np.asarray(w1[key]) + d2[key] + momentum, atol=1e-6)


def test_adam_and_the_refusals(app_root):
    generator, _ = started(app_root, optimizer="adam", lr=0.01)
    assert type(generator.optimizer).__name__ == "Adam" and generator.optimizer.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam, got 'torch.optim.LBFGS'"):
        BundleFedOptShareableGenerator(optimizer="torch.optim.LBFGS")
    with pytest.raises(ValueError, match="lr must be positive"):
        BundleFedOptShareableGenerator(lr=0.0)
