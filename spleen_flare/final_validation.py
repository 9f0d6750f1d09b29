"""Server workflow: every site scores the last global model before the best model is chosen.

``ScatterAndGather`` selects the best global model (``IntimeModelSelector``) on the Dice the sites report at the
start of each round, for the model they received: the last aggregate is never scored, so whenever Dice still rises
the "best" model is the second-to-last one. This workflow runs between training and cross-site evaluation: it
sends the last global model as a ``validate`` task (round header = number of rounds, so sites tell it from
cross-site evaluation), averages the sites' key metric and, if it beats the selector's best, fires NVFlare's
``GLOBAL_BEST_MODEL_AVAILABLE`` so the persistor saves it as the best model. It works on the metrics only, so the
HE job (whose server cannot read the weights) uses it as is.
"""

from __future__ import annotations

import math

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import ReturnCode, Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from spleen_flare.contract import KEY_METRIC
from spleen_flare.workflows import HonoursTaskCheckPeriod, dropped_sites, sites_to_ask


class FinalGlobalValidation(HonoursTaskCheckPeriod, Controller):
    def __init__(
        self,
        model_selector_id: str = "model_selector",
        shareable_generator_id: str = "shareable_generator",
        persistor_id: str = "persistor",
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        key_metric: str = KEY_METRIC,
        timeout: int = 0,
        wait_time_after_min_received: int = 10,
        task_check_period: float = 0.2,
    ) -> None:
        super().__init__(task_check_period=task_check_period)
        self.model_selector_id = model_selector_id
        self.shareable_generator_id = shareable_generator_id
        self.persistor_id = persistor_id
        self.validate_task_name = validate_task_name
        self.key_metric = key_metric
        self.timeout = timeout
        self.wait_time_after_min_received = wait_time_after_min_received
        self._scores: dict[str, float] = {}

    def start_controller(self, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        self.selector = engine.get_component(self.model_selector_id)
        self.shareable_gen = engine.get_component(self.shareable_generator_id)
        self.persistor = engine.get_component(self.persistor_id)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL) or self.persistor.load(fl_ctx)
        last_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        scored_round = (last_round + 1) if isinstance(last_round, int) else None  # as if the next round started
        data: Shareable = self.shareable_gen.learnable_to_shareable(model, fl_ctx)
        data.set_header(AppConstants.CURRENT_ROUND, scored_round)
        self._scores = {}
        task = Task(
            name=self.validate_task_name,
            data=data,
            timeout=self.timeout,
            result_received_cb=self._receive,
        )
        clients = sites_to_ask(fl_ctx)  # not those that dropped out of training: each would cost the timeout
        left_out = f" (not {', '.join(dropped_sites(fl_ctx))}: dropped in training)" if dropped_sites(fl_ctx) else ""
        self.log_info(fl_ctx, f"final validation of the last global model on {len(clients)} sites{left_out}")
        if not clients:
            self.log_warning(fl_ctx, "no site left to score the last global model: best-model selection unchanged")
            return
        self.broadcast_and_wait(
            task=task,
            fl_ctx=fl_ctx,
            targets=clients if dropped_sites(fl_ctx) else None,  # as NVFlare sends it unless a site dropped
            min_responses=len(clients),
            wait_time_after_min_received=self.wait_time_after_min_received,
            abort_signal=abort_signal,
        )
        if abort_signal.triggered or not self._scores:
            self.log_warning(fl_ctx, "no site scored the last global model: best-model selection unchanged")
            return
        self._select(model, scored_round, fl_ctx)

    def _receive(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        result = client_task.result
        site = client_task.client.name if isinstance(client_task.client, Client) else str(client_task.client)
        if result is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            self.log_warning(fl_ctx, f"{site} did not score the last global model")
            return
        try:
            value = float(from_shareable(result).data[self.key_metric])
        except (KeyError, TypeError, ValueError) as err:
            self.log_warning(fl_ctx, f"{site} sent no {self.key_metric}: {err}")
            return
        if math.isfinite(value):
            self._scores[site] = value
        client_task.result = None  # metrics only: nothing to keep

    def _select(self, model, scored_round: int | None, fl_ctx: FLContext) -> None:
        mean = sum(self._scores.values()) / len(self._scores)
        best = getattr(self.selector, "best_val_metric", -math.inf)
        self.log_info(fl_ctx, f"last global model: mean {self.key_metric} {mean:.4f} (best so far {best:.4f})")
        if mean <= best:
            return
        self.selector.best_val_metric = self.selector.best_raw_val_metric = mean
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, model, private=True, sticky=False)
        fl_ctx.set_prop(AppConstants.VALIDATION_RESULT, mean, private=True, sticky=False)
        info = {"source": type(self).__name__, "best_round": scored_round, "best_metrics": {self.key_metric: mean}}
        fl_ctx.set_prop(AppConstants.METRICS_SELECTION_INFO, info, private=True, sticky=False)
        self.fire_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)

    def stop_controller(self, fl_ctx: FLContext) -> None:
        self.cancel_all_tasks()

    def process_result_of_unknown_task(
        self, client: Client, task_name: str, client_task_id: str, result: Shareable, fl_ctx: FLContext
    ) -> None:
        self.log_warning(fl_ctx, f"dropped result of unknown task {task_name} from {client.name}")
