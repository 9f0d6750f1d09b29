"""The jobs' MLflow receiver keeps a site's points while MLflow is unreachable and sends them later, in batches
within MLflow's limits: a real SQLite MLflow store, and a real refused connection for the outage."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.entities import Metric
from nvflare.apis.analytix import AnalyticsDataType

from spleen_flare.mlflow_receiver import ModelTrainingMLflowReceiver
from spleen_tools.procs import free_port

POINTS = 2500  # more than one log_batch may carry (1000 metrics)


@pytest.fixture
def store(tmp_path) -> tuple[mlflow.MlflowClient, str]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("outage")
    return client, client.create_run(experiment).info.run_id


def _receiver(client: mlflow.MlflowClient, run_id: str) -> ModelTrainingMLflowReceiver:
    receiver = ModelTrainingMLflowReceiver(tracking_uri="unused")
    receiver._init_buffer(["site-1"])
    receiver.mlflow_clients, receiver.run_ids = {"site-1": client}, {"site-1": run_id}
    metrics = receiver.buffer["site-1"][AnalyticsDataType.METRICS]
    metrics += [Metric("train_loss", 1.0 / (i + 1), 1795900000000 + i, i) for i in range(POINTS)]
    return receiver


def test_points_wait_out_an_outage_and_arrive_in_batches(store, monkeypatch):
    from nvflare.apis.fl_context import FLContext

    client, run_id = store
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once instead of retrying for minutes
    down = mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    receiver = _receiver(down, run_id)
    receiver.flush_buffers("site-1")  # what NVFlare's event thread calls: returns at once, sends nothing itself
    assert not receiver._send_all()  # the flusher's attempt while MLflow is down
    assert len(receiver.buffer["site-1"][AnalyticsDataType.METRICS]) == POINTS  # kept, none lost
    assert client.get_metric_history(run_id, "train_loss") == []

    receiver.mlflow_clients["site-1"] = client  # MLflow is back
    receiver.finalize(FLContext())  # the job's end: the rest goes, then the run is closed
    assert receiver.buffer["site-1"][AnalyticsDataType.METRICS] == []
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert steps == list(range(POINTS))
    assert client.get_run(run_id).info.status == "FINISHED"
