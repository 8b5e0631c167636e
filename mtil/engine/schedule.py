"""Learning-rate schedule: linear warm-up, then cosine decay to zero (the ZSCL recipe)."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier ``(s+1)/warmup`` for the first ``warmup`` steps, then ``0.5 (1 + cos(pi t))`` down to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


FAIR_WARMUP_SHARE = 0.1  # ZSCL's recipe: 100 warm-up steps in tasks of 1 000


def fair_warmup(warmup: int, total: int) -> int:
    """``warmup`` cut to a tenth of the task's ``total`` steps (at least one step): the default warm-up of a task
    too short for it, so that the run reaches its --lr (100 steps over a 20-step task ended at a fifth of it)."""
    if total <= 0:
        return warmup
    return min(warmup, max(1, math.ceil(total * FAIR_WARMUP_SHARE)))
