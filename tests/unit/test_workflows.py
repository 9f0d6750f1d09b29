"""The jobs' workflows poll their tasks at the configured period (NVFlare 2.9 drops it on the way)."""

from __future__ import annotations

import json

import pytest
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.app_common.workflows import scatter_and_gather

from spleen_flare import workflows
from spleen_flare.final_validation import FinalGlobalValidation
from spleen_flare.he.cross_site_eval import SerializingHECrossSiteModelEval
from spleen_tools.paths import JOBS_DIR


def _polling_period(controller) -> float:
    communicator = WFCommServer()
    controller.set_communicator(communicator)
    return communicator._task_check_period


def test_nvflare_alone_ignores_the_period():
    # when this fails, NVFlare passes the period on itself and spleen_flare/workflows.py can go
    assert _polling_period(scatter_and_gather.ScatterAndGather(task_check_period=0.05)) == 0.2


@pytest.mark.parametrize(
    "controller",
    [
        workflows.ScatterAndGather(task_check_period=0.05),
        workflows.CrossSiteModelEval(task_check_period=0.05),
        FinalGlobalValidation(task_check_period=0.05),
        SerializingHECrossSiteModelEval(task_check_period=0.05),
    ],
    ids=lambda c: type(c).__name__,
)
def test_our_workflows_poll_at_the_configured_period(controller):
    assert _polling_period(controller) == 0.05


@pytest.mark.parametrize("job", ["spleen_ct_segmentation_local", "spleen_ct_segmentation_he"])
def test_jobs_use_the_workflows_that_honour_the_period(job):
    config = json.loads((JOBS_DIR / job / "app" / "config" / "config_fed_server.json").read_text())
    for workflow in config["workflows"]:
        assert workflow["path"].startswith("spleen_flare."), workflow["id"]
        assert workflow["args"]["task_check_period"] <= 0.2, workflow["id"]


class _RecordsPanic(workflows.ScatterAndGather):
    """Our workflow, with ``system_panic`` recorded instead of sent to an engine (there is none in a unit test)."""

    panics: list[str]

    def system_panic(self, reason: str, fl_ctx) -> None:
        self.panics.append(reason)


def _closed_round(answered: set[str], succeeded: set[str], min_clients: int, caplog) -> tuple[list, list[str]]:
    from nvflare.apis.fl_context import FLContext

    from spleen_tools.run.progress import parse_event

    sag = _RecordsPanic(min_clients=min_clients, train_timeout=30)
    sag.panics, sag._current_round = [], 2
    sag._answered, sag._succeeded = answered, succeeded
    with caplog.at_level("WARNING"):
        sag._report_silent_sites(["site-1", "site-2", "site-3"], 31.4, FLContext())
    events = [e for e in (parse_event(r.getMessage()) for r in caplog.records) if e]
    return events, sag.panics


def test_a_silent_site_is_named_and_the_round_goes_on_when_min_clients_answered(caplog):
    events, panics = _closed_round({"site-1", "site-2"}, {"site-1", "site-2"}, 2, caplog)
    assert [(e["kind"], e["site"], e["round"], e["waited_s"]) for e in events] == [("dropped", "site-3", 2, 31.4)]
    assert panics == []


def test_too_few_results_stop_the_job_with_the_reason(caplog):
    events, panics = _closed_round({"site-1", "site-2"}, {"site-1"}, 2, caplog)  # site-2 failed, site-3 silent
    assert [e["site"] for e in events] == ["site-3"]
    assert panics == [
        "round 2: 1 of min_clients 2 sites sent a training result within 31 s (train_timeout 30 s; no result from "
        "site-3): the job stops"
    ]


@pytest.mark.parametrize("job", ["spleen_ct_segmentation_local", "spleen_ct_segmentation_he"])
def test_every_wait_for_a_site_is_bounded_and_one_knob_sets_them(job, tmp_path):
    from spleen_tools.jobs import SITE_TIMEOUTS, JobSettings, prepare_job

    def waits(config: dict) -> dict:
        return {(w["id"], a): w["args"].get(a) for w in config["workflows"] for a in SITE_TIMEOUTS.get(w["id"], ())}

    config = json.loads((JOBS_DIR / job / "app" / "config" / "config_fed_server.json").read_text())
    assert len(waits(config)) == 4 and all(isinstance(v, int) and v > 0 for v in waits(config).values())
    copy = prepare_job(job, tmp_path, JobSettings(site_timeout=45))
    copied = json.loads((copy / "app" / "config" / "config_fed_server.json").read_text())
    assert set(waits(copied).values()) == {45}


def test_a_dropped_site_is_not_asked_again_and_too_few_left_stop_the_next_round(caplog):
    from nvflare.apis.client import Client
    from nvflare.apis.controller_spec import Task
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.shareable import Shareable

    sag = _RecordsPanic(min_clients=2, train_timeout=30)
    sag.panics, sag._current_round = [], 2
    sag._answered, sag._succeeded = {"site-1", "site-2"}, {"site-1", "site-2"}
    ctx = FLContext()
    sag._report_silent_sites(["site-1", "site-2", "site-3"], 31.4, ctx)
    assert workflows.dropped_sites(ctx) == ["site-3"]
    clients = [Client(name, None) for name in ("site-2", "site-3", "site-1")]
    assert workflows.sites_to_ask(ctx, clients) == ["site-1", "site-2"], "site-3 is left out of every later task"
    sag._answered, sag._succeeded = {"site-1"}, {"site-1"}
    sag._report_silent_sites(["site-1", "site-2"], 30.2, ctx)  # the round after: site-2 silent too
    assert workflows.dropped_sites(ctx) == ["site-2", "site-3"] and len(sag.panics) == 1
    sag._current_round = 3
    sag.broadcast_and_wait(Task(name=sag.train_task_name, data=Shareable()), ctx, targets=clients, min_responses=2)
    assert sag.panics[-1] == (
        "round 3: 1 sites left (site-1; dropped: site-2, site-3), fewer than min_clients 2: the job stops"
    )


def test_training_ends_after_the_round_in_which_too_few_sites_have_dp_budget_left():
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext

    from spleen_flare.contract import DP_LAST_ROUND_KEY

    def result(last: str | None):
        meta = {DP_LAST_ROUND_KEY: last} if last else {}
        return DXO(DataKind.WEIGHT_DIFF, data={"w": 1.0}, meta=meta).to_shareable()

    sag = _RecordsPanic(min_clients=2, num_rounds=10, train_timeout=30)
    sag.panics, sag._start_round, sag._current_round, sag._budget_spent = [], 0, 3, {}
    sag._answered, sag._succeeded = {"site-1", "site-2", "site-3"}, {"site-1", "site-2", "site-3"}
    assert workflows._dp_last_round(result("site-3 stops before round 5: ...")) == "site-3 stops before round 5: ..."
    assert workflows._dp_last_round(result(None)) is None
    sag._budget_spent = {"site-3": "spent"}
    sag._end_at_dp_budget(["site-1", "site-2", "site-3"], FLContext())
    assert sag._num_rounds == 10, "two sites can go on: min_clients 2 still met"
    sag._budget_spent["site-2"] = "spent"
    sag._end_at_dp_budget(["site-1", "site-2", "site-3"], FLContext())
    assert sag._num_rounds == 4 and sag.panics == [], "round 3 (from 0) is the last; the job goes on to validation"
