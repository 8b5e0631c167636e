"""``--wise-merge``: WiSE-FT after each task, ``theta <- alpha theta + (1 - alpha) theta_ref``, with
``theta_ref`` the zero-shot weights (the original's only choice) or the task-start weights (``--wise-ref``).

``--wise-ref start`` needs every base parameter (frozen ones too, under plain CLIP names: with ``--lora`` the
adapters are merged by the time it blends), while the run's shared task-start copy (:mod:`mtil.engine.task_start`)
holds only the trainable ones, on the device. So it reuses that copy where it holds the very parameter (same name,
same tensor: without ``--lora``, the trainable weights) *if another component already asked for it* (``--l2``,
``--we-wise``), and keeps CPU copies of the rest, which alone go into its state. It never makes the engine take a
device copy for it: alone, it keeps its whole reference on the CPU, as before. With ``--lora`` the shared copy holds
adapters, which no plain name reaches, so nothing is shared. Either way the reference holds the same values."""
from __future__ import annotations

from typing import Any

import torch

from mtil.engine.method import Component
from mtil.engine.task_start import shared_task_start
from mtil.engine.weights import interpolate, load_into
from mtil.flags import add_flag, unit_interval
from mtil.models.lora import base_named_parameters
from mtil.models.train_modes import CLIP_TRAINING_MODES
from mtil.registry import register


@register
class WiseMerge(Component):
    name = "wise_merge"
    supports_distributed = True  # the same blend of the same weights on every rank
    summary = "WiSE-FT merge after each task"
    enable_flag = "--wise-merge"

    @classmethod
    def run_label(cls, config) -> str:
        return "wise-merge"
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
        self.start: dict[str, torch.Tensor] | None = None  # --wise-ref start: every base parameter, plain names
        self.own: set[str] = set()  # the names of self.start copied here (on the CPU), not the run's shared copy

    def before_task(self, run, task) -> None:
        if self.config.wise_ref != "start":
            return
        shared = shared_task_start(run) or {}  # only if --l2 / --we-wise took it: no device copy for this alone
        params = dict(run.model.named_parameters())  # plain names: with --lora the adapters are injected by now
        self.start, self.own = {}, set()
        for name, param in base_named_parameters(run.model).items():
            if name in shared and params.get(name) is param:
                self.start[name] = shared[name]
            else:
                self.start[name] = param.detach().cpu().clone()
                self.own.add(name)

    def after_task(self, run, task) -> None:
        reference = self.start if self.config.wise_ref == "start" else run.zeroshot_state()
        current = {n: p.detach() for n, p in run.model.named_parameters()}
        load_into(run.model, interpolate(current, reference, self.config.wise_ft_alpha))
        self.start, self.own = None, set()  # let go of the copies (the shared one is freed between tasks)

    def state_dict(self) -> dict[str, Any]:
        # only its own copies: the shared part is the engine's task-start copy, saved once in mid-task checkpoints
        return {"start": None if self.start is None else {n: t for n, t in self.start.items() if n in self.own}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("start")
        if saved is not None:  # (a checkpoint of an older mtil holds every name: then all of them are its own)
            self.start = {**(self.start or {}), **saved}
            self.own |= set(saved)
