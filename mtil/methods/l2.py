"""``--l2 W``: L2 consolidation toward the task-start weights, ``L += W * sum_p ||theta_p - theta0_p||^2``."""
from __future__ import annotations

from typing import Any

import torch

from mtil.args import add_flag, non_negative_float
from mtil.engine.method import Component
from mtil.engine.weights import clone, to_cpu, to_device, trainable_parameters
from mtil.models.train_modes import CLIP_TRAINING_MODES
from mtil.registry import register


@register
class L2Consolidation(Component):
    name = "l2"
    summary = "L2 penalty to the task-start weights"
    enable_flag = "--l2 W"
    flag_group = ("L2 consolidation", "Keep the weights near where each task started.")
    train_modes = CLIP_TRAINING_MODES  # fc trains only a head on frozen features
    order = 20.0

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--l2", type=non_negative_float, default=0.0,
                 help="Weight W of the penalty W * sum ||theta - theta_task_start||^2 (0: off).")

    @classmethod
    def enabled(cls, config) -> bool:
        return config.l2 > 0

    def __init__(self, config):
        super().__init__(config)
        self.anchor: dict[str, torch.Tensor] | None = None

    def before_task(self, run, task) -> None:
        self.anchor = clone(trainable_parameters(run.model))

    def loss(self, run, batch) -> dict[str, torch.Tensor]:
        params = trainable_parameters(run.model)
        total = sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items() if n in params)
        return {"l2": self.config.l2 * total}

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": to_cpu(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("anchor") is not None and self.anchor is not None:
            self.anchor = to_device(state["anchor"], next(iter(self.anchor.values())).device)
