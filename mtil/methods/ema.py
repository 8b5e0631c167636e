"""``--ema DECAY`` (the original's ``--moving-avg``): a real exponential moving average of the weights,
``theta_ema <- d theta_ema + (1 - d) theta`` after every step; the task's result (evaluated, saved, carried on) is
``theta_ema``. The original's ``--moving_avg`` pulled the *training* weights toward a fixed anchor; the flag is
accepted here with the meaning it advertised, an EMA (decay 0.999 when no value is given)."""
from __future__ import annotations

from typing import Any

import torch

from mtil.engine.method import Component
from mtil.engine.weights import clone, load_into, to_cpu, to_device, trainable_parameters
from mtil.flags import add_flag, open_unit_interval
from mtil.models.train_modes import CLIP_TRAINING_MODES
from mtil.registry import register

DEFAULT_DECAY = 0.999


@register
class ExponentialMovingAverage(Component):
    name = "ema"
    supports_distributed = True  # the same average of the same weights on every rank
    summary = "exponential moving average of the weights"
    enable_flag = "--ema"
    flag_group = ("Exponential moving average (EMA)", "The task's result is an EMA of its weights.")
    train_modes = CLIP_TRAINING_MODES  # fc trains only a head on frozen features
    order = 31.0

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--ema", "--moving-avg", type=open_unit_interval, default=None, nargs="?",
                 const=DEFAULT_DECAY, metavar="DECAY",
                 help=f"Exponential moving average of the weights with this decay (without a value: "
                      f"{DEFAULT_DECAY}); the task's result is the EMA. --moving-avg is the original tool's name "
                      f"for it.")

    @classmethod
    def enabled(cls, config) -> bool:
        return config.ema is not None

    def __init__(self, config):
        super().__init__(config)
        self.shadow: dict[str, torch.Tensor] | None = None

    def before_task(self, run, task) -> None:
        self.shadow = clone(trainable_parameters(run.model))

    @torch.no_grad()
    def after_step(self, run) -> None:
        decay = self.config.ema
        params = trainable_parameters(run.model)
        for name, value in self.shadow.items():
            value.mul_(decay).add_(params[name].detach(), alpha=1 - decay)

    def after_task(self, run, task) -> None:
        load_into(run.model, self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": to_cpu(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("shadow") is not None and self.shadow is not None:
            self.shadow = to_device(state["shadow"], next(iter(self.shadow.values())).device)
