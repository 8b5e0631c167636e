"""``--wise-merge``: WiSE-FT after each task, ``theta <- alpha theta + (1 - alpha) theta_ref``, with
``theta_ref`` the zero-shot weights (the original's only choice) or the task-start weights (``--wise-ref``)."""
from __future__ import annotations

from typing import Any

import torch

from mtil.args import add_flag, unit_interval
from mtil.engine.method import Component
from mtil.engine.weights import interpolate, load_into
from mtil.models.lora import base_named_parameters
from mtil.models.train_modes import CLIP_TRAINING_MODES
from mtil.registry import register


@register
class WiseMerge(Component):
    name = "wise_merge"
    summary = "WiSE-FT merge after each task"
    enable_flag = "--wise-merge"
    flag_group = ("WiSE-FT merge", "Blend each task's result with reference weights.")
    train_modes = CLIP_TRAINING_MODES  # fc trains only a head on frozen features
    order = 50.0

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--wise-merge", action="store_true",
                 help="WiSE-FT after each task: weights = alpha * trained + (1 - alpha) * reference (--wise-ref).")
        add_flag(group, "--wise-ft-alpha", type=unit_interval, default=0.8, help="alpha of --wise-merge.")
        add_flag(group, "--wise-ref", default="zeroshot", choices=["zeroshot", "start"],
                 help="Reference weights of --wise-merge: the zero-shot model or the task-start weights.")

    @classmethod
    def enabled(cls, config) -> bool:
        return bool(config.wise_merge)

    def __init__(self, config):
        super().__init__(config)
        self.start: dict[str, torch.Tensor] | None = None

    def before_task(self, run, task) -> None:
        if self.config.wise_ref == "start":  # plain names: with --lora the adapters are injected by now
            self.start = {n: p.detach().cpu().clone() for n, p in base_named_parameters(run.model).items()}

    def after_task(self, run, task) -> None:
        reference = self.start if self.config.wise_ref == "start" else run.zeroshot_state()
        current = {n: p.detach() for n, p in run.model.named_parameters()}
        load_into(run.model, interpolate(current, reference, self.config.wise_ft_alpha))

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("start") is not None:
            self.start = state["start"]
