"""NVFlare's MLflowReceiver, with its experiment marked as model training and no metric lost when MLflow is down.

The design and the reasons for it: docs/design.md, "spleen_flare/mlflow_receiver.py".
"""

from __future__ import annotations

import threading
import time

from mlflow import MlflowClient
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
BATCH_LIMITS = {  # MLflow's log_batch limits per request
    AnalyticsDataType.METRICS: 1000,
    AnalyticsDataType.PARAMETERS: 100,
    AnalyticsDataType.TAGS: 100,
}
RETRY_PAUSE_S = 2.0  # between attempts while MLflow is unreachable (on top of the MLflow client's own retries)


class ModelTrainingMLflowReceiver(MLflowReceiver):
    def __init__(self, *args, final_flush_timeout: float = 300.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.final_flush_timeout = final_flush_timeout
        self._send_lock = threading.Lock()  # one sender at a time: the flusher, or finalize's last attempt
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._flusher: threading.Thread | None = None

    def initialize(self, fl_ctx: FLContext) -> None:
        super().initialize(fl_ctx)  # sets the tracking URI, creates or finds the experiment and the sites' runs
        if self.experiment_id is not None:
            MlflowClient().set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        self._flusher = threading.Thread(target=self._flush_loop, name="mlflow-flusher", daemon=True)
        self._flusher.start()

    def flush_buffers(self, record_origin: str) -> None:
        """Called by NVFlare from the event thread: only wake the flusher (sending could block for minutes)."""
        self._wake.set()

    def _flush_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if not self._send_all() and not self._closing.is_set():
                time.sleep(RETRY_PAUSE_S)

    def _pending(self) -> int:
        return sum(len(b[kind]) for b in self.buffer.values() for kind in BATCH_LIMITS)

    def _send_all(self) -> bool:
        """Every site's buffered points, in batches; True when all went. A batch leaves the buffer once sent
        (buffer_data only appends, so the sent front can be cut while new points arrive)."""
        with self._send_lock:
            for site, buffers in self.buffer.items():
                client, run_id = self.get_mlflow_client(site), self.get_run_id(site)
                while client and run_id and any(buffers[kind] for kind in BATCH_LIMITS):
                    batch = {kind: buffers[kind][:limit] for kind, limit in BATCH_LIMITS.items()}
                    try:
                        client.log_batch(
                            run_id=run_id,
                            metrics=batch[AnalyticsDataType.METRICS],
                            params=batch[AnalyticsDataType.PARAMETERS],
                            tags=batch[AnalyticsDataType.TAGS],
                        )
                    except Exception as err:  # MLflow unreachable past its client's retries: keep the points
                        self.logger.warning(f"MLflow did not take {site}'s points ({err}); {self._pending()} kept")
                        return False
                    for kind, sent in batch.items():
                        del buffers[kind][: len(sent)]
        return True

    def finalize(self, fl_ctx: FLContext) -> None:
        """Deliver what is left (waiting up to ``final_flush_timeout`` for MLflow), then close the sites' runs."""
        self._closing.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout=self.final_flush_timeout)
        deadline = time.monotonic() + self.final_flush_timeout
        while not self._send_all() and time.monotonic() < deadline:
            time.sleep(RETRY_PAUSE_S)
        if self._pending():
            self.log_error(fl_ctx, f"MLflow unreachable at the job's end: {self._pending()} points not delivered")
        for site, run_id in self.run_ids.items():
            if run_id:
                self.mlflow_clients[site].set_terminated(run_id)
