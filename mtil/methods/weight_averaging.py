"""Weight-space components that combine with any method: L2 consolidation, weight ensembling (WE / we_wise),
a real EMA, and the WiSE-FT merge at a task's end.

Each keeps its own state (anchors, running averages) in ``state_dict`` so a preempted run resumes from the
*training* weights plus the averaging state, never from averaged weights alone.
"""
from __future__ import annotations

from typing import Any

import torch

from mtil.methods.base import Method
from mtil.models.lora import base_named_parameters


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _clone(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def _to_cpu(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {n: t.detach().cpu() for n, t in tensors.items()}


def _to(tensors: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}


@torch.no_grad()
def load_into(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in values.items():
        params[name].copy_(value)


@torch.no_grad()
def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``alpha * a + (1 - alpha) * b`` over the names of ``a``."""
    return {n: alpha * a[n] + (1 - alpha) * b[n].to(a[n].device) for n in a}


class L2Consolidation(Method):
    """``L += l2 * sum_p ||theta_p - theta0_p||^2`` with ``theta0`` the weights at the task's start."""

    name = "l2"

    def __init__(self, config):
        super().__init__(config)
        self.anchor: dict[str, torch.Tensor] | None = None

    def before_task(self, run, task) -> None:
        self.anchor = _clone(trainable_parameters(run.model))

    def loss(self, run, batch) -> dict[str, torch.Tensor]:
        params = trainable_parameters(run.model)
        total = sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items() if n in params)
        return {"l2": self.config.l2 * total}

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": _to_cpu(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("anchor") is not None and self.anchor is not None:
            device = next(iter(self.anchor.values())).device
            self.anchor = _to(state["anchor"], device)


class WeightEnsemble(Method):
    """WE: every ``avg_freq`` steps ``theta_we <- (n theta_we + theta) / (n + 1)`` from the task-start weights;
    at the task's end the model becomes ``theta_we`` (``--we-wise``: ``alpha theta_we + (1-alpha) theta_start``)."""

    name = "we"

    def __init__(self, config):
        super().__init__(config)
        self.start: dict[str, torch.Tensor] | None = None
        self.average: dict[str, torch.Tensor] | None = None
        self.count = 0

    def before_task(self, run, task) -> None:
        self.start = _clone(trainable_parameters(run.model))
        self.average = _clone(self.start)
        self.count = 1

    @torch.no_grad()
    def after_step(self, run) -> None:
        if run.state.step % self.config.avg_freq != 0:
            return
        params = trainable_parameters(run.model)
        for name, avg in self.average.items():
            avg.mul_(self.count / (self.count + 1)).add_(params[name].detach(), alpha=1 / (self.count + 1))
        self.count += 1

    def after_task(self, run, task) -> None:
        final = self.average
        if self.config.we_wise:
            final = interpolate(self.average, self.start, self.config.we_wise_alpha)
        load_into(run.model, final)

    def state_dict(self) -> dict[str, Any]:
        return {"start": _to_cpu(self.start), "average": _to_cpu(self.average), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("average") is not None and self.average is not None:
            device = next(iter(self.average.values())).device
            self.start, self.average = _to(state["start"], device), _to(state["average"], device)
            self.count = int(state["count"])


class ExponentialMovingAverage(Method):
    """A real EMA: ``theta_ema <- d theta_ema + (1 - d) theta`` after every step; the task's result (evaluated
    and saved) is ``theta_ema``."""

    name = "ema"

    def __init__(self, config):
        super().__init__(config)
        self.shadow: dict[str, torch.Tensor] | None = None

    def before_task(self, run, task) -> None:
        self.shadow = _clone(trainable_parameters(run.model))

    @torch.no_grad()
    def after_step(self, run) -> None:
        decay = self.config.ema
        params = trainable_parameters(run.model)
        for name, value in self.shadow.items():
            value.mul_(decay).add_(params[name].detach(), alpha=1 - decay)

    def after_task(self, run, task) -> None:
        load_into(run.model, self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": _to_cpu(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("shadow") is not None and self.shadow is not None:
            self.shadow = _to(state["shadow"], next(iter(self.shadow.values())).device)


class WiseMerge(Method):
    """WiSE-FT after training: ``theta <- alpha theta + (1 - alpha) theta_ref``, ``theta_ref`` = the task-start
    weights or the zero-shot weights (``--wise-ref``)."""

    name = "wise_merge"

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
