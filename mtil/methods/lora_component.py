"""``--lora``: each task trains fresh LoRA adapters instead of CLIP's weights and merges them in at its end.

One component that acts at two places of the hook order:

* ``before_task`` right after the method's: injects fresh adapters (``B = 0``: outputs
  unchanged; initialised from ``seed + task index`` without touching the global RNG streams) and makes exactly the
  adapters of the encoders ``--train-mode`` trains trainable (minus ``--freeze`` patterns); every base weight is
  frozen (``logit_scale`` keeps what the method asked for). Being after the method, the method's teachers (LwF,
  ZSCL, iCaRL) are built from the plain model; being before L2 / WE / EMA, those snapshot the *adapter* parameters
  (their anchors, averages and shadows are adapter values, and they load the averaged adapters back at the task's
  end; note that averaging factors ``A``, ``B`` is not averaging the products ``B A``).
* ``after_task`` after L2 / WE / EMA and before the WiSE merge (``hook_order``): it merges the (averaged)
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

from mtil.engine.method import Component
from mtil.errors import UserError
from mtil.flags import add_flag, dropout, name_list, positive_float, positive_int
from mtil.models.lora import (
    DEFAULT_TARGETS,
    LoraSettings,
    count_trainable,
    has_lora,
    inject_lora,
    is_lora_name,
    lora_parameters,
    merge_lora,
    resolve_targets,
)
from mtil.models.backend import logit_bias
from mtil.models.train_modes import (
    CLIP_TRAINING_MODES,
    is_image_param,
    is_text_param,
    trains_image,
    trains_text,
)
from mtil.registry import register

SEED_OFFSET = 7_919  # adapter initialisation seed = --seed + this + task index


@register
class LoraAdapters(Component):
    name = "lora"
    supports_distributed = True  # its adapters are the trained parameters DDP averages
    summary = "LoRA adapters trained instead of CLIP's weights"
    enable_flag = "--lora"
    flag_group = ("LoRA", "Low-rank adapters (through peft) trained instead of CLIP's weights and merged into them "
                          "at each task's end, so every task checkpoint holds a plain CLIP (docs/methods/lora.md).")
    train_modes = CLIP_TRAINING_MODES  # fc trains only a head on frozen features
    train_modes_note = ("fc trains only a linear head on frozen features, so LoRA would have nothing to adapt; "
                        "image-fc trains image-encoder adapters and the head")
    trains_instead_of_clip = True
    conflicts = {"ogd": "--orthogonal-gradients projects gradients of CLIP's weights, which --lora freezes (only "
                        "fresh per-task adapters train): use one of them"}
    requires = {"lora_shared_split_qkvo": "lora_shared"}

    @classmethod
    def run_label(cls, config) -> str:
        return "shared-lora" if getattr(config, "lora_shared", False) else "lora"
    order = 10.0  # inject after the method built its teachers, before L2 / WE / EMA snapshot the adapters
    hook_order = {"after_task": 40.0}  # merge after L2 / WE / EMA produced the adapters, before WiSE blends

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--lora", role="shapes_optimizer", action="store_true",
                 help="Train LoRA adapters on --lora-target-modules instead of CLIP's weights: fresh adapters at "
                      "each task's start (B = 0: outputs unchanged), merged into the weights at its end. "
                      "--train-mode picks which encoder's adapters train (image: image encoder only; image-fc: "
                      "plus the head); not with fc.")
        add_flag(group, "--lora-r", role="shapes_optimizer", type=positive_int, default=8,
                 help="Rank r of every adapter.")
        add_flag(group, "--lora-alpha", type=positive_float, default=16,
                 help="Adapter scaling: the update is (alpha / r) * B A.")
        add_flag(group, "--lora-dropout", type=dropout, default=0.0,
                 help="Dropout on the input of the Linear (MLP) adapters (default 0; the seed used 0.1). Attention "
                      "adapters act through the weights (peft's MultiheadAttention LoRA), which takes no dropout.")
        add_flag(group, "--lora-target-modules", role="shapes_optimizer", type=name_list, default=list(DEFAULT_TARGETS),
                 metavar="NAMES",
                 help="Comma-separated module names; a name matches every module called so or ending in '.NAME'. "
                      "'attn': q, k, v and o of every nn.MultiheadAttention; 'attn.in_proj': q, k and v; "
                      "'attn.out_proj': o; 'attn.q', 'attn.k', 'attn.v', 'attn.o': one projection; 'mlp.c_fc', "
                      "'mlp.c_proj': the MLP linears; both encoders. scripts/list_clip_layers.py lists the names a "
                      "model accepts.")
        add_flag(group, "--lora-shared", role="shapes_optimizer", action="store_true",
                 help="Share adapters across layers: every adapter reuses the A and B of the first one with the "
                      "same (encoder, layer type attn/mlp, shapes); attention never shares with MLP.")
        add_flag(group, "--lora-shared-split-qkvo", role="shapes_optimizer", action="store_true",
                 help="With --lora-shared: the projection (q, k, v, o) joins the sharing key, so q shares only with "
                      "q, etc.")

    @classmethod
    def enabled(cls, config) -> bool:
        return bool(config.lora)

    @classmethod
    def check_config(cls, config) -> None:
        if not config.lora_target_modules:
            raise UserError("--lora-target-modules names no module (e.g. attn,mlp.c_fc,mlp.c_proj)")

    def __init__(self, config):
        super().__init__(config)
        self.settings = LoraSettings.from_args(config)
        self.model: torch.nn.Module | None = None

    def check_model(self, model) -> None:
        """On the meta twin: the targets exist, the --freeze patterns name base or adapter parameters, and the
        train mode leaves some adapter to train."""
        resolve_targets(model, self.settings.targets)  # a bad target: one-line UserError before anything runs
        inject_lora(model, self.settings)
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        for pattern in self.config.freeze or []:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                adapters = [n for n in names if is_lora_name(n)]
                raise UserError(f"--freeze pattern {pattern!r} matches no parameter (with --lora, e.g. "
                                f"{adapters[0]}, {names[1]})")
        if not self._mark_trainable(model):
            raise UserError(f"--lora-target-modules {','.join(self.settings.targets)} with --train-mode "
                            f"{self.config.train_mode}{' and --freeze' if self.config.freeze else ''} leaves no "
                            f"adapter to train (adapters train in the encoders the mode trains)")

    def _mark_trainable(self, model) -> int:
        """Freeze every base weight; adapters train in the encoders ``--train-mode`` trains, minus ``--freeze``
        patterns. Returns how many adapter parameters train."""
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
        return sum(wanted.values())

    def before_task(self, run, task) -> None:
        model = run.model
        if has_lora(model):  # a task left unmerged (cannot happen in a run; be safe for hand-made flows)
            merge_lora(model)
        logit_params = [model.logit_scale, *([bias] if (bias := logit_bias(model)) is not None else [])]
        logit_trains = [p.requires_grad for p in logit_params]
        inject_lora(model, self.settings, seed=self.config.seed + SEED_OFFSET + run.state.task_index)
        self.model = model
        mode = self.config.train_mode
        self._mark_trainable(model)
        for param, trains in zip(logit_params, logit_trains):  # as the method asked
            param.requires_grad_(trains)
        s = self.settings
        message = (f"LoRA on {task.name}: {count_trainable(model):,} trainable parameters (r {s.r}, alpha {s.alpha:g}, "
                   f"targets {','.join(s.targets)}{', shared' if s.shared else ''}"
                   f"{' by q/k/v/o' if s.split_qkvo else ''}; --train-mode {mode})")
        print(message, flush=True)
        run.log.info(message)

    def after_task(self, run, task) -> None:
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
