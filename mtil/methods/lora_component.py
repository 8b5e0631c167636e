"""``--lora``: each task trains fresh LoRA adapters instead of CLIP's weights and merges them in at its end.

Two components share one state (``build_components`` places them):

* :class:`LoraAdapters`, right after the method. ``before_task`` injects fresh adapters (``B = 0``: outputs
  unchanged; initialised from ``seed + task index`` without touching the global RNG streams) and makes exactly the
  adapters of the encoders ``--train-mode`` trains trainable (minus ``--freeze`` patterns); every base weight is
  frozen (``logit_scale`` keeps what the method asked for). Being after the method, the method's teachers (LwF,
  ZSCL, iCaRL) are built from the plain model; being before L2 / WE / EMA, those snapshot the *adapter* parameters
  (their anchors, averages and shadows are adapter values, and they load the averaged adapters back at the task's
  end; note that averaging factors ``A``, ``B`` is not averaging the products ``B A``).
* :class:`LoraMerge`, after L2 / WE / EMA and before the WiSE merge: ``after_task`` merges the (averaged)
  adapters into the base weights and removes the adapter layers, so WiSE blends plain weights and the task
  checkpoint (``<Dataset>.pth``, the task-end ``latest.pth``) holds a plain CLIP state dict.

Mid-task checkpoints hold the base weights under plain names (``SequenceRunner._payload`` uses
:func:`mtil.models.lora.base_state_dict`) and the adapter tensors in this component's state; a resume rebuilds the
plain model, ``before_task`` re-injects, and ``load_state_dict`` (called after ``before_task`` on a mid-task resume)
copies the adapters back, so the optimiser state (built over the same parameters in the same order) fits.
"""
from __future__ import annotations

import fnmatch
from typing import Any

import torch

from mtil.methods.base import Method
from mtil.models.lora import (
    LoraSettings,
    count_trainable,
    has_lora,
    inject_lora,
    is_lora_name,
    lora_parameters,
    merge_lora,
    resolve_targets,
)
from mtil.models.train_modes import is_image_param, is_text_param, trains_image, trains_text

SEED_OFFSET = 7_919  # adapter initialisation seed = --seed + this + task index


class LoraAdapters(Method):
    name = "lora"

    def __init__(self, config):
        super().__init__(config)
        self.settings = LoraSettings.from_args(config)
        self.model: torch.nn.Module | None = None
        self.merge_step = LoraMerge(config, self)

    def check_model(self, model) -> None:
        resolve_targets(model, self.settings.targets)  # a bad target: one-line UserError before anything runs

    def before_task(self, run, task) -> None:
        model = run.model
        if has_lora(model):  # a task left unmerged (cannot happen in a run; be safe for hand-made flows)
            merge_lora(model)
        logit_scale_trains = model.logit_scale.requires_grad
        inject_lora(model, self.settings, seed=self.config.seed + SEED_OFFSET + run.state.task_index)
        self.model = model
        mode, patterns = self.config.train_mode, list(self.config.freeze or [])
        wanted: dict[int, bool] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if not is_lora_name(name):
                param.requires_grad_(False)
                continue
            train = (trains_image(mode) and is_image_param(name)) or (trains_text(mode) and is_text_param(name))
            frozen = any(fnmatch.fnmatchcase(name, p) for p in patterns)
            # a shared parameter trains when every name it has wants it (sharing never crosses encoders)
            wanted[id(param)] = wanted.get(id(param), True) and train and not frozen
        for param in model.parameters():
            if id(param) in wanted:
                param.requires_grad_(wanted[id(param)])
        model.logit_scale.requires_grad_(logit_scale_trains)
        s = self.settings
        message = (f"LoRA on {task.name}: {count_trainable(model):,} trainable parameters (r {s.r}, alpha {s.alpha:g}, "
                   f"targets {','.join(s.targets)}{', shared' if s.shared else ''}"
                   f"{' by q/k/v/o' if s.split_qkvo else ''}; --train-mode {mode})")
        print(message, flush=True)
        run.log.info(message)

    def merge(self, run) -> None:
        if has_lora(run.model):
            merge_lora(run.model)
        self.model = None

    def state_dict(self) -> dict[str, Any]:
        if self.model is None or not has_lora(self.model):
            return {"adapters": None}
        return {"adapters": {n: p.detach().cpu().clone() for n, p in lora_parameters(self.model).items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        adapters = state.get("adapters")
        if adapters is None or self.model is None or not has_lora(self.model):
            return  # at build time (no adapters yet) or a task-boundary checkpoint: nothing to restore
        params = lora_parameters(self.model)
        if set(params) != set(adapters):
            raise RuntimeError("the checkpoint's LoRA adapters do not match the injected ones "
                               f"({len(adapters)} saved, {len(params)} injected)")
        for name, value in adapters.items():
            params[name].copy_(value)


class LoraMerge(Method):
    """The end-of-task half of :class:`LoraAdapters`: merges the adapters (after weight averaging, before WiSE)."""

    name = "lora_merge"

    def __init__(self, config, adapters: LoraAdapters):
        super().__init__(config)
        self.adapters = adapters

    def after_task(self, run, task) -> None:
        self.adapters.merge(run)
