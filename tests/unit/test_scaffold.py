"""SCAFFOLD: the server's generator (real FLContext, the bundle's network) and the site's correction in the bundle's
own trainer (real BundleRunner on tiny synthetic NIfTI data)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from tiny_site import QUICK, tiny_site

from spleen_flare.bundle_runner import BundleRunner, build_network
from spleen_flare.contract import SCAFFOLD_CONTROL_PREFIX
from spleen_flare.scaffold import ScaffoldShareableGenerator, split_controls, with_controls
from spleen_tools.paths import BUNDLE_SRC


@pytest.fixture(scope="module")
def app_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaffold") / "app"
    shutil.copytree(BUNDLE_SRC, root / "config" / "spleen_ct_segmentation")
    return root


def started(app_root) -> tuple[ScaffoldShareableGenerator, FLContext]:
    generator = ScaffoldShareableGenerator()
    ctx = FLContext()
    ctx.set_prop(FLContextKey.APP_ROOT, str(app_root), private=True, sticky=False)
    generator.handle_event(EventType.START_RUN, ctx)
    return generator, ctx


def test_the_server_sends_its_controls_beside_the_model_and_keeps_them_out_of_the_global_model(app_root):
    generator, ctx = started(app_root)
    network = build_network(BUNDLE_SRC, ["configs/train.json"])
    params = {name: p.shape for name, p in network.named_parameters()}
    w0 = {k: v.numpy().copy() for k, v in network.state_dict().items()}
    sent = from_shareable(generator.learnable_to_shareable(make_model_learnable(w0, {}), ctx)).data
    weights, controls = split_controls(sent)
    assert set(weights) == set(w0) and set(controls) == set(params), "a control per trainable parameter, no buffer"
    assert all(not controls[k].any() and controls[k].shape == tuple(params[k]) for k in controls), "c starts at 0"
    assert not any(k.startswith(SCAFFOLD_CONTROL_PREFIX) for k in w0), "the global model itself is left alone"

    rng = np.random.default_rng(0)
    diff = {k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in w0.items() if v.dtype == np.float32}
    delta_c = {k: rng.normal(0, 1.0, tuple(s)).astype(np.float32) for k, s in params.items()}
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(dict(w0), {}), private=True, sticky=False)
    aggregate = DXO(DataKind.WEIGHT_DIFF, with_controls(diff, delta_c)).to_shareable()
    new = generator.shareable_to_learnable(aggregate, ctx)[ModelLearnableKey.WEIGHTS]
    assert set(new) == set(w0), "the persisted global model holds no control variate"
    for key, d in diff.items():
        np.testing.assert_allclose(np.asarray(new[key]), w0[key] + d, atol=1e-7)
    next_round = generator.learnable_to_shareable(make_model_learnable(new, {}), ctx)
    _, controls = split_controls(from_shareable(next_round).data)
    assert all(np.array_equal(controls[k], delta_c[k]) for k in params), "c += the sites' averaged delta c_i"

    odd = DXO(DataKind.WEIGHT_DIFF, with_controls(diff, {"no.such.layer": np.zeros(1, np.float32)})).to_shareable()
    with pytest.raises(ValueError, match="control updates for parameters the network lacks: \\['no.such.layer'\\]"):
        generator.shareable_to_learnable(odd, ctx)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    bundle, data_dir, training, validation = tiny_site(tmp_path_factory.mktemp("scaffold_site"), 2, (48, 48, 12))
    runner = BundleRunner(bundle, QUICK, data_dir, training, validation)
    runner.use_scaffold()
    return runner


def test_every_optimizer_step_is_corrected_and_the_sites_control_follows_how_far_it_moved(runner):
    """With a global control c = 50 and c_i = 0, every step moves each weight by -lr x 50 besides the optimizer's
    own step (a few lr at most), so after K steps the weights sit about 50 x lr x K lower; the site's new control
    is c_i = (x - y) / (K lr) - c (SCAFFOLD's option II), and it is what the round returns as delta c_i."""
    names = [name for name, p in runner.network.named_parameters() if p.requires_grad]
    lr = float(runner.trainer.optimizer.param_groups[0]["lr"])
    for rnd in range(2):
        x = runner.get_weights()
        runner.anchor_to_current()
        c = {name: torch.full_like(x[name], 50.0) for name in names}
        runner.scaffold_start(c)
        steps = runner.train(1)
        assert runner.scaffold.cnt == steps > 0, "one correction per optimizer step, counted afresh each round"
        y = runner.get_weights()
        moved = torch.cat([((x[k] - y[k]) / (steps * lr)).flatten() for k in names])
        assert moved.mean().item() == pytest.approx(50.0, abs=1.0) and moved.min() > 40 and moved.max() < 60
        delta = runner.scaffold_end()
        expected_local = {k: (x[k] - y[k]) / (steps * lr) - c[k] for k in names}
        if rnd == 0:  # c_i was 0: delta c_i is the new c_i
            for k in names:
                np.testing.assert_allclose(delta[k], expected_local[k].numpy(), rtol=1e-4, atol=1e-3)
        assert set(delta) == set(names)
    with pytest.raises(RuntimeError, match="scaffold_start was not called this round"):
        runner.scaffold_end()
    with pytest.raises(ValueError, match="came without control variates; the server's job must use SCAFFOLD"):
        runner.scaffold_start({})
