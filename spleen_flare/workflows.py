"""NVFlare workflows whose ``task_check_period`` takes effect, and a ScatterAndGather that names a silent site.

NVFlare 2.9's ``Controller.set_communicator`` hands the period on as ``communicator.task_check_period``, while
``WFCommServer`` polls with its own ``_task_check_period`` (always 0.2 s) and never reads the public one. A round
whose last result has arrived then waits for up to two such polls (the task's completion check, then the
workflow's wait for the task) before aggregation starts. The subclasses below pass the configured period on.

A site that dies mid-round sends nothing and, with ``train_timeout`` 0, is waited for forever (NVFlare drops a
client only after its heartbeat timeout, 10 minutes, and even then may go on with fewer results than
``min_clients``). Our ScatterAndGather logs a ``dropped`` line for every site without a training result when a
round closes (``train_timeout`` bounds it) and stops the job with the reason when fewer than ``min_clients``
sites answered, instead of aggregating what came. A dropped site is not asked again in this job (later rounds,
final validation, cross-site evaluation): NVFlare still lists it until its heartbeat timeout, and each task would
wait the full site timeout for it.
"""

from __future__ import annotations

import time

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.wf_comm_spec import WFCommSpec
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows import cross_site_model_eval, scatter_and_gather

from spleen_flare.contract import DP_LAST_ROUND_KEY, PROGRESS_TAG, tagged_line
from spleen_flare.resume import RESUME_POINT_PROP, ResumePoint


class HonoursTaskCheckPeriod:
    """Mixin for a ``Controller`` subclass: its ``task_check_period`` also sets the communicator's polling."""

    _task_check_period: float

    def set_communicator(self, communicator: WFCommSpec) -> None:
        super().set_communicator(communicator)  # type: ignore[misc]
        if hasattr(communicator, "_task_check_period"):
            communicator._task_check_period = self._task_check_period


DROPPED_SITES_PROP = "spleen.dropped_sites"  # sticky: the sites that went silent in this job's training


def _name(client: Client | str) -> str:
    return client.name if isinstance(client, Client) else str(client)


def dropped_sites(fl_ctx: FLContext) -> list[str]:
    return sorted(fl_ctx.get_prop(DROPPED_SITES_PROP) or ())


def sites_to_ask(fl_ctx: FLContext, clients=None) -> list[str]:
    """The sites a task goes to: ``clients`` (default: every site the server knows), less those that dropped."""
    dropped = set(dropped_sites(fl_ctx))
    return sorted(_name(c) for c in (clients or fl_ctx.get_engine().get_clients()) if _name(c) not in dropped)


class LeavesOutDroppedSites:
    """Mixin for NVFlare's CrossSiteModelEval (and its HE variant): sites that dropped out of training are neither
    asked for a model nor to score one."""

    _participating_clients: list[str] | None

    def start_controller(self, fl_ctx: FLContext) -> None:
        if not self._participating_clients and dropped_sites(fl_ctx):
            self._participating_clients = sites_to_ask(fl_ctx)
            self.log_info(  # type: ignore[attr-defined]
                fl_ctx, f"cross-site evaluation without {', '.join(dropped_sites(fl_ctx))} (dropped in training)"
            )
        super().start_controller(fl_ctx)  # type: ignore[misc]


def rounds_left(next_round: int, start_round: int, num_rounds: int) -> tuple[int, int]:
    """(start round, number of rounds) of a resumed job: from ``next_round`` to the end the job was configured for
    (NVFlare runs rounds ``start_round .. start_round + num_rounds - 1``)."""
    end = start_round + num_rounds
    start = min(max(next_round, start_round), end)
    return start, end - start


class ScatterAndGather(HonoursTaskCheckPeriod, scatter_and_gather.ScatterAndGather):
    """NVFlare's FedAvg workflow that names the sites that sent no training result and honours ``min_clients``."""

    _answered: set[str]
    _succeeded: set[str]
    _budget_spent: dict[str, str]  # DP: sites whose budget allows no further round, and their reasons

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._budget_spent = {}

    def start_controller(self, fl_ctx: FLContext) -> None:
        """As NVFlare's; a job that resumes an earlier one (its persistor found the point) starts at the round after
        the old job's last global model and runs the rest of ``num_rounds`` (the total of both jobs)."""
        super().start_controller(fl_ctx)
        point = fl_ctx.get_prop(RESUME_POINT_PROP)
        if isinstance(point, ResumePoint):
            self._start_round, self._num_rounds = rounds_left(point.next_round, self._start_round, self._num_rounds)
            fl_ctx.set_prop(AppConstants.START_ROUND, self._start_round, private=True, sticky=True)
            self.log_info(
                fl_ctx, f"resuming job {point.job_id}: {self._num_rounds} rounds from round {self._start_round}"
            )

    def _process_train_result(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        result, site = client_task.result, _name(client_task.client)
        self._answered.add(site)
        if result is not None and result.get_return_code(ReturnCode.OK) == ReturnCode.OK:
            self._succeeded.add(site)
            reason = _dp_last_round(result)
            if reason:
                self._budget_spent[site] = reason
        super()._process_train_result(client_task, fl_ctx)

    def broadcast_and_wait(
        self,
        task: Task,
        fl_ctx: FLContext,
        targets=None,
        min_responses: int = 1,
        wait_time_after_min_received: int = 0,
        abort_signal: Signal | None = None,
    ):
        if task.name != self.train_task_name:
            return super().broadcast_and_wait(
                task, fl_ctx, targets, min_responses, wait_time_after_min_received, abort_signal
            )
        self._answered, self._succeeded = set(), set()
        expected = [s for s in sites_to_ask(fl_ctx, targets) if s not in self._budget_spent]
        if dropped_sites(fl_ctx) or self._budget_spent:  # else the task goes out as NVFlare sends it (targets as given)
            if len(expected) < self._min_clients:
                self.system_panic(
                    f"round {self._current_round}: {len(expected)} sites left ({', '.join(expected) or 'none'}; "
                    f"dropped: {', '.join(dropped_sites(fl_ctx))}), fewer than min_clients {self._min_clients}: "
                    "the job stops",
                    fl_ctx,
                )
                return None
            targets, self._current_num_targets = expected, len(expected)
        start = time.monotonic()
        super().broadcast_and_wait(task, fl_ctx, targets, min_responses, wait_time_after_min_received, abort_signal)
        if abort_signal is not None and abort_signal.triggered:
            return None
        self._report_silent_sites(expected, time.monotonic() - start, fl_ctx)
        self._end_at_dp_budget(expected, fl_ctx)
        return None

    def _end_at_dp_budget(self, expected: list[str], fl_ctx: FLContext) -> None:
        """When too few sites have DP budget left for another round, this round is the last: training ends after
        its aggregation (the model is persisted as after a last round) and the job goes on to validation."""
        can_go_on = [s for s in expected if s in self._succeeded and s not in self._budget_spent]
        last = self._start_round + self._num_rounds - 1
        if not self._budget_spent or len(can_go_on) >= self._min_clients or self._current_round >= last:
            return
        spent = ", ".join(sorted(self._budget_spent))
        self.log_info(
            fl_ctx,
            f"training ends after round {self._current_round} of {self._num_rounds}: {spent} reached the DP budget "
            f"({len(can_go_on)} sites could go on, min_clients {self._min_clients})",
        )
        self._num_rounds = self._current_round - self._start_round + 1

    def _report_silent_sites(self, expected: list[str], waited: float, fl_ctx: FLContext) -> None:
        silent = [s for s in expected if s not in self._answered]
        for site in silent:
            line = tagged_line(
                PROGRESS_TAG,
                kind="dropped",
                site=site,
                round=self._current_round,
                task=self.train_task_name,
                waited_s=round(waited, 1),
                at=round(time.time(), 3),
            )
            self.log_warning(fl_ctx, line)
        if silent:
            fl_ctx.set_prop(DROPPED_SITES_PROP, sorted({*dropped_sites(fl_ctx), *silent}), private=True, sticky=True)
        if len(self._succeeded) < self._min_clients:
            missing = ", ".join(silent) or "none silent; the others failed"
            self.system_panic(
                f"round {self._current_round}: {len(self._succeeded)} of min_clients {self._min_clients} sites sent a "
                f"training result within {waited:.0f} s (train_timeout {self._train_timeout} s; no result from "
                f"{missing}): the job stops",
                fl_ctx,
            )


def _dp_last_round(result) -> str | None:
    """A site's note that its DP budget allows no further round (in its result's meta), else None."""
    try:
        return (from_shareable(result).meta or {}).get(DP_LAST_ROUND_KEY)
    except ValueError:  # not a DXO (an error reply)
        return None


class CrossSiteModelEval(LeavesOutDroppedSites, HonoursTaskCheckPeriod, cross_site_model_eval.CrossSiteModelEval):
    pass
