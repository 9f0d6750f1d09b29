"""NVFlare workflows whose ``task_check_period`` takes effect.

NVFlare 2.9's ``Controller.set_communicator`` hands the period on as ``communicator.task_check_period``, while
``WFCommServer`` polls with its own ``_task_check_period`` (always 0.2 s) and never reads the public one. A round
whose last result has arrived then waits for up to two such polls (the task's completion check, then the
workflow's wait for the task) before aggregation starts. The subclasses below pass the configured period on.
"""

from __future__ import annotations

from nvflare.apis.wf_comm_spec import WFCommSpec
from nvflare.app_common.workflows import cross_site_model_eval, scatter_and_gather


class HonoursTaskCheckPeriod:
    """Mixin for a ``Controller`` subclass: its ``task_check_period`` also sets the communicator's polling."""

    _task_check_period: float

    def set_communicator(self, communicator: WFCommSpec) -> None:
        super().set_communicator(communicator)  # type: ignore[misc]
        if hasattr(communicator, "_task_check_period"):
            communicator._task_check_period = self._task_check_period


class ScatterAndGather(HonoursTaskCheckPeriod, scatter_and_gather.ScatterAndGather):
    pass


class CrossSiteModelEval(HonoursTaskCheckPeriod, cross_site_model_eval.CrossSiteModelEval):
    pass
