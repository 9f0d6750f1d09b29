"""A job resumes from the global model an earlier job of the same server persisted last (real persistor, real
checkpoints on disk, the real network of the bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from spleen_flare import __version__
from spleen_flare.contract import JOB_VERSION_KEY
from spleen_flare.model_selection import ResumableModelSelector
from spleen_flare.persistor import BundleModelPersistor, weights_digest
from spleen_flare.resume import HISTORY_FILE, RESUME_POINT_PROP, RESUMED_EVENT, ResumeError, old_app_dir, resume_point
from spleen_flare.workflows import rounds_left
from spleen_tools.jobs import JobSettings, prepare_job
from spleen_tools.paths import BUNDLE_SRC, OVERRIDES_SRC

BEST_DICE = 0.61


def _app(workspace: Path, job_id: str) -> Path:
    """A job's server app as NVFlare deploys it: the bundle and overrides the server installed, the job's meta."""
    app = workspace / job_id / "app_server"
    (app / "config").mkdir(parents=True)
    (app / "config" / "spleen_ct_segmentation").symlink_to(BUNDLE_SRC)
    (app / "config" / "overrides").symlink_to(OVERRIDES_SRC)
    (app.parent / "meta.json").write_text(json.dumps({JOB_VERSION_KEY: __version__}))
    return app


def _started(app: Path, resume_from: str = "") -> tuple[BundleModelPersistor, FLContext]:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app), private=True, sticky=True)
    persistor = BundleModelPersistor(resume_from=resume_from)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    return persistor, fl_ctx


def _shifted(ml: dict, by: float) -> dict:
    weights = {k: (v + by).astype(v.dtype) for k, v in ml[ModelLearnableKey.WEIGHTS].items()}
    return make_model_learnable(weights, {})


def _run_old_job(workspace: Path, rounds: int, best_round: int | None = 0) -> tuple[Path, list[dict]]:
    """An old job that persisted ``rounds`` global models (the model of ``best_round`` saved as the best)."""
    app = _app(workspace, "job-a")
    persistor, fl_ctx = _started(app)
    ml = persistor.load_model(fl_ctx)
    models = []
    for rnd in range(rounds):
        ml = _shifted(ml, 0.01)
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
        persistor.save_model(ml, fl_ctx)
        models.append(ml)
        if rnd == best_round:
            fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, ml, private=True, sticky=False)
            info = {"best_round": rnd + 1, "best_metrics": {"val_mean_dice": BEST_DICE}}
            fl_ctx.set_prop(AppConstants.METRICS_SELECTION_INFO, info, private=True, sticky=False)
            persistor.handle_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)
    return app, models


def test_a_new_job_goes_on_from_the_last_persisted_model(tmp_path):
    old_app, models = _run_old_job(tmp_path, rounds=2)
    new_app = _app(tmp_path, "job-b")
    persistor, fl_ctx = _started(new_app, resume_from="job-a")
    ml = persistor.load_model(fl_ctx)

    assert weights_digest(ml[ModelLearnableKey.WEIGHTS]) == weights_digest(models[-1][ModelLearnableKey.WEIGHTS])
    point = fl_ctx.get_prop(RESUME_POINT_PROP)
    assert (point.job_id, point.next_round, point.best_metric) == ("job-a", 2, BEST_DICE)
    old_history = json.loads((old_app / HISTORY_FILE).read_text())
    new_history = json.loads((new_app / HISTORY_FILE).read_text())
    assert new_history == [*old_history, {"resumed_from": "job-a", "next_round": 2}]
    assert (new_app / "best_FL_global_model.pt").read_bytes() == (old_app / "best_FL_global_model.pt").read_bytes()

    # the next save continues the history where the old job stopped
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 2, private=True, sticky=False)
    persistor.save_model(_shifted(ml, 0.01), fl_ctx)
    history = json.loads((new_app / HISTORY_FILE).read_text())
    rounds = [e["round"] for e in history if "sha256" in e and not e.get("best")]
    assert rounds == ["initial", 0, 1, 2]


def test_a_round_recorded_but_never_written_is_run_again(tmp_path):
    # killed between the history entry and the checkpoint: the checkpoint is still round 0's
    old_app, models = _run_old_job(tmp_path, rounds=1)
    history = json.loads((old_app / HISTORY_FILE).read_text())
    (old_app / HISTORY_FILE).write_text(json.dumps([*history, {"round": 1, "sha256": "f" * 64}]))
    point = resume_point("job-a", old_app, weights_digest(models[0][ModelLearnableKey.WEIGHTS]), None)
    assert point.next_round == 1
    assert point.history == history


def test_killed_before_the_first_round_resumes_from_the_initial_model(tmp_path):
    _run_old_job(tmp_path, rounds=0)
    persistor, fl_ctx = _started(_app(tmp_path, "job-b"), resume_from="job-a")
    persistor.load_model(fl_ctx)
    assert fl_ctx.get_prop(RESUME_POINT_PROP).next_round == 0


def test_the_selector_keeps_the_old_best_metric(tmp_path):
    _run_old_job(tmp_path, rounds=2)
    persistor, fl_ctx = _started(_app(tmp_path, "job-b"), resume_from="job-a")
    persistor.load_model(fl_ctx)
    selector = ResumableModelSelector(key_metric="val_mean_dice")
    selector.handle_event(RESUMED_EVENT, fl_ctx)
    assert selector.best_val_metric == pytest.approx(BEST_DICE)


def test_a_best_checkpoint_newer_than_its_entry_is_not_claimed(tmp_path):
    old_app, _ = _run_old_job(tmp_path, rounds=2)
    point = resume_point("job-a", old_app, json.loads((old_app / HISTORY_FILE).read_text())[-1]["sha256"], "0" * 64)
    assert point.best is None and point.next_round == 2


@pytest.mark.parametrize(
    "next_round, expected",
    [(0, (0, 5)), (2, (2, 3)), (5, (5, 0)), (7, (5, 0))],
)
def test_a_resumed_job_runs_the_rest_of_the_configured_rounds(next_round, expected):
    assert rounds_left(next_round, start_round=0, num_rounds=5) == expected


@pytest.mark.parametrize(
    "job_id, files, expected",
    [
        ("../job-a", {}, "not a job id"),
        ("job-x", {}, "no such job folder"),
        ("job-a", {HISTORY_FILE: "{"}, "unreadable"),
        ("job-a", {HISTORY_FILE: "[]"}, "no initial model recorded"),
    ],
)
def test_cannot_resume_is_one_clear_line_and_the_job_stops(tmp_path, job_id, files, expected):
    old = tmp_path / "job-a" / "app_server"
    old.mkdir(parents=True)
    for name, text in files.items():
        (old / name).write_text(text)
    persistor, fl_ctx = _started(_app(tmp_path, "job-b"), resume_from=job_id)
    panics = []
    persistor.system_panic = lambda reason, ctx: panics.append(reason)
    assert persistor.load_model(fl_ctx) is None
    assert len(panics) == 1 and expected in panics[0] and "\n" not in panics[0]


def test_a_checkpoint_from_another_run_is_refused(tmp_path):
    old_app, _ = _run_old_job(tmp_path, rounds=1)
    with pytest.raises(ResumeError, match="matches no round"):
        resume_point("job-a", old_app, "0" * 64, None)


def test_old_app_dir_is_beside_this_jobs_folder(tmp_path):
    assert old_app_dir(tmp_path / "job-b" / "app_server", "job-a") == tmp_path / "job-a" / "app_server"


def test_a_resumed_job_copy_names_the_old_job(tmp_path):
    job = prepare_job("spleen_ct_segmentation_local", tmp_path, JobSettings(rounds=3, resume_from="job-a"))
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert server["resume_from"] == "job-a"
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["resume_from"] == "{resume_from}"
    receiver = next(c for c in server["components"] if c["id"] == "mlflow_receiver")
    assert receiver["args"]["kw_args"]["run_tags"]["resumed_from"] == "job-a"
    with pytest.raises(ValueError, match="not a job id"):
        prepare_job("spleen_ct_segmentation_local", tmp_path, JobSettings(resume_from="../x"))
