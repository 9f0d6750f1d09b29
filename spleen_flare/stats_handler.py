"""Ignite handler that streams bundle training/validation stats to the FL server."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
from ignite.engine import Engine, Events
from nvflare.apis.analytix import AnalyticsDataType

logger = logging.getLogger(__name__)


class MetricSink(Protocol):
    """What the handler needs of a sender: nvflare's ``MetricsSender`` satisfies it."""

    def add(self, tag: str, value: Any, data_type: AnalyticsDataType, **kwargs: Any) -> bool: ...


def _to_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _first_loss(output: Any) -> Any:
    # SupervisedTrainer output: a list of dicts (one per sample from RandCrop) or a dict.
    if isinstance(output, list) and output:
        output = output[0]
    if isinstance(output, dict):
        return output.get("loss")
    return output


class NVFlareStatsHandler:
    """Send an engine's loss and metrics through NVFlare's metric relay.

    Attach once to the trainer (iteration loss, epoch loss mean and train metrics) and once to the evaluator
    (validation metrics). Steps are the trainer's global iteration and epoch, which keep growing from round to
    round, so no step repeats across FL rounds; the evaluator's epoch is the trainer epoch it validated.
    ``enabled`` lets the caller mute the handler, e.g. while the evaluator scores a model that is not local.
    """

    def __init__(
        self,
        sender: MetricSink,
        iteration_log: bool = True,
        epoch_log: bool = True,
        loss_tag: str = "train_loss",
        output_transform: Callable[[Any], Any] = _first_loss,
        enabled: Callable[[], bool] | None = None,
    ) -> None:
        self.sender = sender
        self.iteration_log = iteration_log
        self.epoch_log = epoch_log
        self.loss_tag = loss_tag
        self.output_transform = output_transform
        self.enabled = enabled
        self._epoch_losses: list[float] = []
        self.sent = 0
        self.last_epoch_loss = float("nan")
        self.failed = 0

    def attach(self, engine: Engine) -> None:
        if self.iteration_log:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        if self.epoch_log:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _send(self, tag: str, value: float, step: int) -> None:
        if self.sender.add(tag, value, AnalyticsDataType.SCALAR, global_step=int(step)):
            self.sent += 1
        else:
            self.failed += 1
            logger.warning("metric %s at step %d was not delivered", tag, step)

    def _active(self) -> bool:
        return self.enabled is None or self.enabled()

    def iteration_completed(self, engine: Engine) -> None:
        if not self._active():
            return
        loss = _to_float(self.output_transform(engine.state.output))
        if loss is None:
            return
        self._epoch_losses.append(loss)
        self._send(self.loss_tag, loss, engine.state.iteration)

    def epoch_completed(self, engine: Engine) -> None:
        if not self._active():
            self._epoch_losses.clear()
            return
        step = engine.state.epoch
        if self._epoch_losses:
            self.last_epoch_loss = sum(self._epoch_losses) / len(self._epoch_losses)
            self._send(f"{self.loss_tag}_epoch", self.last_epoch_loss, step)
            self._epoch_losses.clear()
        for name, value in engine.state.metrics.items():
            number = _to_float(value)
            if number is not None:
                self._send(name, number, step)
