"""Training methods by name (``--method``) and the components that combine with them."""
from __future__ import annotations

import argparse

from mtil.errors import UserError
from mtil.methods.base import Method
from mtil.methods.contrastive import Contrastive
from mtil.methods.finetune import Finetune
from mtil.methods.icarl import ICaRL
from mtil.methods.lora_component import LoraAdapters
from mtil.methods.ogd import OrthogonalGradients
from mtil.methods.reference_distillation import ZSCL, LwF, LwFVR
from mtil.methods.weight_averaging import ExponentialMovingAverage, L2Consolidation, WeightEnsemble, WiseMerge

METHODS: dict[str, type[Method]] = {
    "finetune": Finetune,
    "lwf": LwF,
    "lwf-vr": LwFVR,
    "ZSCL": ZSCL,
    "icarl": ICaRL,
    "contrastive": Contrastive,
}


def build_method(config: argparse.Namespace) -> Method:
    if config.method not in METHODS:
        raise UserError(f"unknown --method {config.method!r}; accepted: {', '.join(METHODS)}")
    return METHODS[config.method](config)


def build_components(config: argparse.Namespace) -> list[Method]:
    """The method first, then the weight-space components its flags ask for (order matters at a task's end:
    averaging produces the task's weights before a WiSE merge blends them)."""
    method = build_method(config)
    if config.method == "contrastive" and config.train_mode != "whole":
        raise UserError("--method contrastive trains both encoders: use --train-mode whole")
    if config.train_mode == "fc" and (config.l2 or config.we or config.ema is not None or config.wise_merge
                                      or config.method not in ("finetune",)):
        raise UserError("--train-mode fc trains only a linear head on frozen features: weight averaging, L2 and "
                        "distillation methods do not apply (use --method finetune without them)")
    if config.train_mode == "text" and config.method in ("lwf", "lwf-vr", "ZSCL", "icarl"):
        raise UserError(f"--method {config.method} distils through the image encoder (student images against the "
                        f"teacher's sentence features, as in ZSCL), which --train-mode text freezes: the "
                        f"distillation would do nothing; use --train-mode whole or image")
    if config.train_mode == "fc" and getattr(config, "orthogonal_gradients", None):
        raise UserError("--orthogonal-gradients projects CLIP's gradients, but --train-mode fc trains only a linear "
                        "head on frozen features")
    lora = LoraAdapters(config) if getattr(config, "lora", False) else None
    if lora is not None and getattr(config, "orthogonal_gradients", None):
        raise UserError("--orthogonal-gradients projects gradients of CLIP's weights, which --lora freezes "
                        "(only fresh per-task adapters train): use one of them")
    components = [method]
    if lora is not None:
        # LoRA: injected after the method built its teachers (from the plain model), before L2 / WE / EMA snapshot
        # the (adapter) parameters; merged after they produced the task's adapters, before WiSE blends plain weights.
        components.append(lora)
    if config.l2:
        components.append(L2Consolidation(config))
    if config.we:
        components.append(WeightEnsemble(config))
    if config.ema is not None:
        components.append(ExponentialMovingAverage(config))
    if lora is not None:
        components.append(lora.merge_step)
    if config.wise_merge:
        components.append(WiseMerge(config))
    if getattr(config, "orthogonal_gradients", None):
        components.append(OrthogonalGradients(config))  # only touches gradients: its place in the order is free
    return components
