"""``--we``: weight ensembling (ZSCL). Every ``--avg-freq`` steps ``theta_we <- (n theta_we + theta) / (n + 1)``,
starting from the task-start weights, and once more with the final weights when the task's length is not a multiple
of ``--avg-freq`` (the original dropped those steps: a task shorter than ``--avg-freq`` returned its start weights);
at the task's end the model becomes ``theta_we`` (``--we-wise``:
``alpha theta_we + (1 - alpha) theta_start``, applied once). The running average is part of the resumable state,
so a preempted run continues the same average from the *training* weights.

``theta_start`` is the run's one shared copy of the task-start weights (:mod:`mtil.engine.task_start`, the same
tensors as ``--l2``'s anchor), held only with ``--we-wise`` and saved once by the engine, not in this component's
state. A checkpoint of an older mtil carries it here as ``start``: it is copied into the shared copy in place."""
from __future__ import annotations

from typing import Any

import torch

from mtil.engine.method import Component
from mtil.engine.task_start import copy_into, task_start_weights
from mtil.engine.weights import clone, interpolate, load_into, to_cpu, to_device, trainable_parameters
from mtil.flags import add_flag, positive_int, unit_interval
from mtil.models.train_modes import CLIP_TRAINING_MODES
from mtil.registry import register


@register
class WeightEnsemble(Component):
    name = "we"
    supports_distributed = True  # the same average of the same weights on every rank
    summary = "weight ensembling"
    enable_flag = "--we"
    flag_group = ("Weight ensembling (WE)", "Average the weights along each task's trajectory (ZSCL's WE).")
    train_modes = CLIP_TRAINING_MODES  # fc trains only a head on frozen features
    conflicts = {"ema": "both average the weights: choose one"}
    requires = {"we_wise_alpha": "we_wise"}
    order = 30.0

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--we", action="store_true",
                 help="Weight ensembling: average the weights every --avg-freq steps; the task's result is the "
                      "average.")
        add_flag(group, "--avg-freq", type=positive_int, default=100, help="Steps between weight-ensembling updates.")
        add_flag(group, "--we-wise", action="store_true",
                 help="With --we: the result is alpha * average + (1 - alpha) * task-start weights.")
        add_flag(group, "--we-wise-alpha", type=unit_interval, default=0.98, help="alpha of --we-wise.")

    @classmethod
    def enabled(cls, config) -> bool:
        return bool(config.we)

    def __init__(self, config):
        super().__init__(config)
        self.start: dict[str, torch.Tensor] | None = None
        self.average: dict[str, torch.Tensor] | None = None
        self.count = 0

    def before_task(self, run, task) -> None:
        self.average = clone(trainable_parameters(run.model))
        # The task-start weights are needed again only by --we-wise's blend: the run's shared copy (with --l2 it is
        # the anchor), not one of its own (a ViT-B/16 copy is 600 MB on the device).
        self.start = task_start_weights(run) if self.config.we_wise else None
        self.count = 1

    @torch.no_grad()
    def after_step(self, run) -> None:
        if run.state.step % self.config.avg_freq != 0:
            return
        self.fold_in(trainable_parameters(run.model))

    def fold_in(self, params: dict[str, torch.Tensor]) -> None:
        for name, avg in self.average.items():
            avg.mul_(self.count / (self.count + 1)).add_(params[name].detach(), alpha=1 / (self.count + 1))
        self.count += 1

    @torch.no_grad()
    def after_task(self, run, task) -> None:
        if run.state.step % self.config.avg_freq != 0:
            # The task's last steps came after the last averaging step (or it had fewer steps than --avg-freq,
            # when the average would be the start weights alone): its final weights join the average, so no
            # training is thrown away. For a task of a multiple of --avg-freq steps nothing changes.
            self.fold_in(trainable_parameters(run.model))
        final = self.average
        if self.config.we_wise:
            final = interpolate(self.average, self.start, self.config.we_wise_alpha)
        load_into(run.model, final)
        self.start = None  # let go of the shared copy: the engine frees it between tasks

    def state_dict(self) -> dict[str, Any]:
        return {"average": to_cpu(self.average), "count": self.count}  # the start: the engine's, saved once

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("average") is not None and self.average is not None:
            self.average = to_device(state["average"], next(iter(self.average.values())).device)
            self.count = int(state["count"])
            if state.get("start") is not None and self.start is not None:  # a checkpoint of an older mtil
                copy_into(self.start, state["start"])
