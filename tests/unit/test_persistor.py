"""The server's persistor (spleen_flare/persistor.py) on its own: the bundle's network as the initial model, global
and best models written and read back, the digest history, and what it refuses. Resuming an earlier job is
tests/unit/test_resume.py's; the HE persistor is tests/he's."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from spleen_flare import __version__
from spleen_flare.bundle_runner import build_network
from spleen_flare.contract import JOB_VERSION_KEY, KEY_METRIC
from spleen_flare.persistor import BundleModelPersistor, weights_digest
from spleen_flare.resume import HISTORY_FILE
from spleen_tools.paths import BUNDLE_SRC, OVERRIDES_SRC


def _app(workspace: Path, job_id: str = "job-1", version: str = __version__) -> Path:
    """A job's server app as NVFlare deploys it: the installed bundle and overrides, the job's meta."""
    app = workspace / job_id / "app_server"
    (app / "config").mkdir(parents=True)
    (app / "config" / "spleen_ct_segmentation").symlink_to(BUNDLE_SRC)
    (app / "config" / "overrides").symlink_to(OVERRIDES_SRC)
    (app.parent / "meta.json").write_text(json.dumps({JOB_VERSION_KEY: version}))
    return app


class _Panics(list):
    """``system_panic`` recorded instead of sent to an engine (a unit test has none)."""

    def __call__(self, reason: str, fl_ctx: FLContext) -> None:
        self.append(reason)


def _started(app: Path, **args) -> tuple[BundleModelPersistor, FLContext, _Panics]:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app), private=True, sticky=True)
    persistor = BundleModelPersistor(**args)
    persistor.system_panic = panics = _Panics()
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    return persistor, fl_ctx, panics


def _history(app: Path) -> list[dict]:
    return json.loads((app / HISTORY_FILE).read_text())


def _moved(ml: dict, by: float) -> dict:
    return make_model_learnable({k: (v + by).astype(v.dtype) for k, v in ml[ModelLearnableKey.WEIGHTS].items()}, {})


def _read_weights(checkpoint: Path) -> dict:
    """A checkpoint as anyone downstream reads it: torch alone, tensors and plain containers only."""
    return {k: v.numpy() for k, v in torch.load(checkpoint, map_location="cpu", weights_only=True)["model"].items()}


def test_weights_digest_names_the_model_not_its_container():
    weights = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), dtype=np.float32)}
    digest = weights_digest(weights)
    # key order and array type do not matter: a torch state dict and NVFlare's numpy copy of it are one model
    assert weights_digest(dict(reversed(weights.items()))) == digest
    assert weights_digest({k: torch.from_numpy(v) for k, v in weights.items()}) == digest
    # nor does the precision an aggregate comes in: the digest is over float32, as the checkpoint holds it
    assert weights_digest({k: v.astype(np.float64) for k, v in weights.items()}) == digest
    # one value, or the name a tensor has, does
    assert weights_digest({**weights, "b": np.array([0, 1, 2.5], dtype=np.float32)}) != digest
    assert weights_digest({"a": weights["a"], "c": weights["b"]}) != digest


def test_the_initial_model_is_the_bundles_network_under_the_seed(tmp_path):
    persistor, fl_ctx, panics = _started(_app(tmp_path), seed=0)
    initial = persistor.load_model(fl_ctx)[ModelLearnableKey.WEIGHTS]
    bundle = build_network(BUNDLE_SRC, ["configs/train.json"], seed=0).state_dict()
    assert initial.keys() == bundle.keys()
    assert weights_digest(initial) == weights_digest(bundle)  # every site and every rerun start from this model
    assert _history(Path(persistor.log_dir)) == [{"round": "initial", "sha256": weights_digest(initial)}]
    other, other_ctx, _ = _started(_app(tmp_path, "job-2"), seed=1)
    assert weights_digest(other.load_model(other_ctx)[ModelLearnableKey.WEIGHTS]) != weights_digest(initial)
    assert panics == []


def test_a_saved_global_model_reads_back_and_is_in_the_history(tmp_path):
    app = _app(tmp_path)
    persistor, fl_ctx, _ = _started(app)
    initial = persistor.load_model(fl_ctx)
    for rnd in range(2):
        model = _moved(initial, 0.1 * (rnd + 1))
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
        persistor.save_model(model, fl_ctx)

    digest = weights_digest(model[ModelLearnableKey.WEIGHTS])
    assert weights_digest(_read_weights(app / "FL_global_model.pt")) == digest
    # what cross-site evaluation gets from the persistor (NVFlare's model locator asks it by file name)
    located = persistor.get_model("FL_global_model.pt", fl_ctx)
    assert weights_digest(located[ModelLearnableKey.WEIGHTS]) == digest
    history = _history(app)
    assert [e["round"] for e in history] == ["initial", 0, 1]
    assert history[-1]["sha256"] == digest  # the last entry names the checkpoint on disk
    assert len({e["sha256"] for e in history}) == 3, "each round's model has its own digest"
    assert sorted(p.name for p in app.iterdir() if p.suffix == ".tmp") == [], "history written by rename"


def test_a_new_best_model_is_saved_and_recorded_by_the_round_of_its_aggregate(tmp_path):
    app = _app(tmp_path)
    persistor, fl_ctx, _ = _started(app)
    best = _moved(persistor.load_model(fl_ctx), 0.3)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, best, private=True, sticky=False)
    # the selectors name the round whose sites scored the model: they score the model they received
    info = {"best_round": 3, "best_metrics": {KEY_METRIC: 0.71}}
    fl_ctx.set_prop(AppConstants.METRICS_SELECTION_INFO, info, private=True, sticky=False)
    persistor.handle_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)

    digest = weights_digest(best[ModelLearnableKey.WEIGHTS])
    assert weights_digest(_read_weights(app / "best_FL_global_model.pt")) == digest
    assert _history(app)[-1] == {"best": True, "round": 2, "sha256": digest, KEY_METRIC: 0.71}

    # a selector that names no round: the entry says so instead of guessing
    fl_ctx.set_prop(AppConstants.METRICS_SELECTION_INFO, None, private=True, sticky=False)
    persistor.handle_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)
    assert _history(app)[-1] == {"best": True, "round": None, "sha256": digest}


def test_a_job_for_another_version_stops_before_any_model_is_built(tmp_path):
    app = _app(tmp_path, version="0.0.0-other")
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app), private=True, sticky=True)
    persistor = BundleModelPersistor()
    persistor.system_panic = panics = _Panics()
    with pytest.raises(RuntimeError, match="asks for spleen_flare 0.0.0-other"):
        persistor.handle_event(EventType.START_RUN, fl_ctx)
    assert len(panics) == 1 and "asks for spleen_flare 0.0.0-other" in panics[0] and "\n" not in panics[0]
    assert persistor.model is None
    assert list(app.glob("*.pt")) == [] and not (app / HISTORY_FILE).exists()


class TouchOnLoad:
    """Unpickled, this calls ``Path.touch(marker)``: a crafted checkpoint's ``os.system``, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted(path: Path, marker: Path, with_torch: bool = True) -> None:
    payload = {"model": {"weight": torch.zeros(2)}, "train_conf": TouchOnLoad(marker)}
    if with_torch:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # the protocol torch.load expects


@pytest.mark.parametrize("with_torch", [True, False], ids=["torch.save", "plain-pickle"])
def test_a_crafted_checkpoint_to_resume_from_runs_nothing_and_stops_the_job(tmp_path, with_torch):
    marker = tmp_path / "payload_ran"
    old_app = _app(tmp_path, "job-a")
    _crafted(old_app / "FL_global_model.pt", marker, with_torch)
    persistor, fl_ctx, panics = _started(_app(tmp_path, "job-b"), resume_from="job-a")

    assert persistor.load_model(fl_ctx) is None
    assert not marker.exists(), "unpickling the crafted checkpoint ran its code"
    assert len(panics) == 1 and "\n" not in panics[0]
    assert f"{old_app / 'FL_global_model.pt'}: cannot be read as a global model" in panics[0]


def test_a_crafted_checkpoint_in_the_job_is_not_handed_out(tmp_path):
    # cross-site evaluation and the export read the job's checkpoints back through the persistor
    marker = tmp_path / "payload_ran"
    app = _app(tmp_path)
    persistor, fl_ctx, _ = _started(app)
    persistor.load_model(fl_ctx)
    _crafted(app / "best_FL_global_model.pt", marker)
    assert persistor.get_model("best_FL_global_model.pt", fl_ctx) is None
    assert not marker.exists(), "unpickling the crafted checkpoint ran its code"
