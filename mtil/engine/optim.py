"""The optimiser of a task and its parameter groups (``--optimizer``, ``--lr-multipliers``).

Without multipliers every trainable parameter is in one group, in the order ``parameters_of`` gives (CLIP's,
then the extra modules'), so optimiser state dicts keep one layout. With multipliers the parameters split into
parts — image (``visual.*``), text (the rest of CLIP), head (modules outside CLIP, e.g. a linear head) — each a
group with ``lr = --lr * factor``; the warm-up/cosine schedule scales every group alike. A method may reshape the
groups (``Method.parameter_groups``) or bring its own optimiser (``Method.optimizer``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from mtil.engine.run import TaskSettings
from mtil.models.train_modes import is_image_param, parameters_of


def part_of(name: str | None) -> str:
    """image, text, or head (``None``: a parameter outside CLIP)."""
    if name is None:
        return "head"
    return "image" if is_image_param(name) else "text"


def parameter_groups(model: nn.Module, extra: Sequence[nn.Module], lr: float,
                     multipliers: dict[str, float]) -> list[dict[str, Any]]:
    params = parameters_of([model, *extra])
    if not multipliers:
        return [{"params": params}] if params else []
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[str, list[nn.Parameter]] = {}
    for param in params:
        groups.setdefault(part_of(names.get(id(param))), []).append(param)
    return [{"params": ps, "lr": lr * multipliers.get(part, 1.0), "part": part} for part, ps in groups.items()]


def build_optimizer(name: str, groups: list[dict[str, Any]], settings: TaskSettings,
                    momentum: float = 0.0) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.wd, betas=(0.9, settings.beta2))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=momentum, weight_decay=settings.wd)
    raise ValueError(f"unknown optimizer {name!r}")
