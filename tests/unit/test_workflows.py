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
