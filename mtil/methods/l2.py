"""``--l2 W``: L2 consolidation toward the task-start weights, ``L += W * sum_p ||theta_p - theta0_p||^2``.

The penalty's gradient is known in closed form, ``2 W (theta - theta0)``, so it is not built into the autograd
graph and back-propagated (about 300 tensors for a ViT-B, every step): :meth:`loss` reports its value (computed
without a graph) and :meth:`after_backward` adds ``2 W (theta - theta0)`` to the gradients with one foreach
operation. A trainable tensor the other losses leave without a gradient gets that term alone, as autograd would
give it. It runs before OGD's projection (``order``), so the projected gradient is that of the whole loss.

The anchor ``theta0`` is the run's one shared copy of the task-start weights (:mod:`mtil.engine.task_start`, the
same tensors as ``--we-wise``'s start), not a clone of its own; the engine saves it once in mid-task checkpoints, so
this component's state is empty. A checkpoint of an older mtil carries it here as ``anchor``: it is copied into the
shared copy in place."""
from __future__ import annotations

from typing import Any

import torch

from mtil.engine.method import Component
from mtil.engine.task_start import copy_into, task_start_weights
from mtil.engine.weights import trainable_parameters
from mtil.flags import add_flag, non_negative_float
from mtil.models.train_modes import CLIP_TRAINING_MODES
from mtil.registry import register


@register
class L2Consolidation(Component):
    name = "l2"
    supports_distributed = True  # adds the same closed-form gradient to the all-reduced gradients on every rank
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
        self.anchor = task_start_weights(run)  # shared, read-only

    @torch.no_grad()
    def _differences(self, run) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        params = trainable_parameters(run.model)
        names = [n for n in self.anchor if n in params]
        tensors = [params[n] for n in names]
        return tensors, torch._foreach_sub([t.detach() for t in tensors], [self.anchor[n] for n in names])

    def loss(self, run, batch) -> dict[str, torch.Tensor]:
        params, differences = self._differences(run)
        self._pending = (params, differences)  # after_backward adds them to the gradients (the same weights)
        if not differences:
            return {"l2": torch.zeros((), device=run.device)}
        squares = torch.stack(torch._foreach_norm(differences)).float().pow(2).sum()
        return {"l2": self.config.l2 * squares}

    @torch.no_grad()
    def after_backward(self, run) -> None:
        pending, self._pending = getattr(self, "_pending", None), None
        params, differences = pending if pending is not None else self._differences(run)
        if not params:
            return
        factor = 2 * self.config.l2
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        without = [i for i, p in enumerate(params) if p.grad is None]
        if without or not _fits_float32(factor):  # (foreach's alpha must fit a float32; a huge W must give inf)
            torch._foreach_mul_(differences, factor)
            factor = 1.0
        for i in without:
            params[i].grad = differences[i]
        if with_grad:
            torch._foreach_add_([params[i].grad for i in with_grad], [differences[i] for i in with_grad],
                                alpha=factor)

    def after_task(self, run, task) -> None:
        self.anchor = None  # let go of the shared copy: the engine frees it between tasks

    def state_dict(self) -> dict[str, Any]:
        return {}  # the anchor is the engine's task-start copy, saved once in mid-task checkpoints

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("anchor") is not None and self.anchor is not None:  # a checkpoint of an older mtil
            copy_into(self.anchor, state["anchor"])


def _fits_float32(value: float) -> bool:
    return abs(value) <= torch.finfo(torch.float32).max
