"""NVFlareStatsHandler on real ignite engines: what it sends, at which steps."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from nvflare.apis.analytix import AnalyticsDataType

from spleen_flare.stats_handler import NVFlareStatsHandler


class RecordingSink:
    """Stands in for the transport only; the real MetricsSender -> MetricRelay path is tested end to end."""

    def __init__(self, accept: bool = True) -> None:
        self.records: list[tuple[str, float, int]] = []
        self.accept = accept

    def add(self, tag, value, data_type, **kwargs):
        assert data_type == AnalyticsDataType.SCALAR
        self.records.append((tag, value, kwargs["global_step"]))
        return self.accept


def _trainer(losses):
    it = iter(losses)

    def step(engine, batch):
        return [{"loss": torch.tensor(next(it))}]

    return Engine(step)


def test_iteration_and_epoch_loss_with_growing_steps():
    sink = RecordingSink()
    trainer = _trainer([1.0, 3.0, 0.5, 1.5])
    handler = NVFlareStatsHandler(sink)
    handler.attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    # Second "round": the trainer continues, so steps keep growing.
    trainer.state.max_epochs = 2
    trainer.run()
    losses = [(s, v) for t, v, s in sink.records if t == "train_loss"]
    epochs = [(s, v) for t, v, s in sink.records if t == "train_loss_epoch"]
    assert losses == [(1, 1.0), (2, 3.0), (3, 0.5), (4, 1.5)]
    assert epochs == [(1, 2.0), (2, 1.0)]
    assert handler.sent == 6 and handler.failed == 0
    assert handler.last_epoch_loss == 1.0


def test_evaluator_metrics_at_the_validated_epoch_and_muting():
    sink = RecordingSink()
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def set_metric(engine):
        engine.state.metrics["val_mean_dice"] = torch.tensor(0.25)
        engine.state.metrics["not_a_scalar"] = torch.ones(3)

    enabled = {"on": True}
    NVFlareStatsHandler(sink, iteration_log=False, enabled=lambda: enabled["on"]).attach(evaluator)
    evaluator.run([0], max_epochs=1)
    enabled["on"] = False
    evaluator.run([0], max_epochs=1)
    assert sink.records == [("val_mean_dice", 0.25, 1)]


def test_undelivered_metrics_are_counted():
    sink = RecordingSink(accept=False)
    trainer = _trainer([1.0])
    handler = NVFlareStatsHandler(sink)
    handler.attach(trainer)
    trainer.run([0], max_epochs=1)
    assert handler.failed == 2 and handler.sent == 0
