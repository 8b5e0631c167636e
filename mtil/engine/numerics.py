"""The numerical guard: a non-finite loss or gradient never reaches the weights, and non-finite weights are never
written.

A step whose loss (any term) or, in fp32/bf16, whose gradients are not finite either stops the run with a one-line
error (exit code 2; the checkpoints already written stay as they were) or, under ``--skip-nonfinite N``, is skipped
(no optimiser step) up to N times in the run. In fp16 the gradient scaler skips steps with overflowed gradients by
design: those are not errors, only a non-finite loss is.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from mtil.errors import UserError
from mtil.finite import all_finite, finite_flag, first_nonfinite  # noqa: F401 - re-exported


class NonFiniteError(UserError):
    """A loss, gradient or weight that is NaN or infinite: the run stops before anything is written."""


def describe_losses(losses: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {value.detach().float().item():.4g}" for name, value in losses.items())


class NonFiniteGuard:
    """Decides, per step, whether the step may update the weights; counts skipped steps against ``limit``."""

    def __init__(self, limit: int, skipped: int = 0):
        self.limit = limit
        self.skipped = skipped  # over the whole run (kept in the training state, so a resume keeps counting)

    def problem(self, losses: Mapping[str, torch.Tensor], total: torch.Tensor,
                gradients: list[torch.Tensor] | None) -> str | None:
        """What is not finite at this step, or None (one host sync when all is well). ``gradients`` None: not
        checked (fp16's scaler skips such steps itself)."""
        flags = [torch.isfinite(total.detach()).reshape(())]
        if gradients is not None:
            flags.append(finite_flag(gradients).to(total.device))
        if bool(torch.stack(flags).all()):
            return None
        if not math.isfinite(total.detach().float().item()):
            return f"the loss is not finite ({describe_losses(losses)})"
        return f"the gradients are not finite (loss {describe_losses(losses)})"

    def allow_skip(self, problem: str, where: str) -> bool:
        """True: skip this step (counted); raises :class:`NonFiniteError` once the limit is used up."""
        if self.skipped < self.limit:
            self.skipped += 1
            return True
        hint = ("lower --lr (or the loss weights, --T, --l2, --lora-alpha), or allow a few skipped steps with "
                "--skip-nonfinite N" if self.limit == 0 else f"--skip-nonfinite {self.limit} steps already skipped")
        raise NonFiniteError(f"{where}: {problem}; stopped before it reached the weights, the checkpoints already "
                             f"written are kept ({hint})")


EXPLOSION_FACTOR = 1e4  # a saved weight may grow to this many times max(1, its largest |value| at the start)


def largest_values(tensors: list[torch.Tensor]) -> list[float]:
    """The largest |value| of each tensor (NaN for a tensor holding a NaN), in one fused pass per device."""
    if not tensors:
        return []
    return [float(v) for v in torch.stack([n.float().cpu() for n in torch._foreach_norm(
        [t.detach() for t in tensors], float("inf"))])]


class WeightsGuard:
    """Refuses to save weights that are not finite or have exploded. The bound of a tensor is
    :data:`EXPLOSION_FACTOR` times the larger of 1 and its largest |value| at the start (the runner gives the
    zero-shot weights, so a resumed run and each link of a chain have the straight run's bounds); a tensor that
    did not exist then (a head, an adapter) has the bound of a start of 1. Training that works moves weights by far less; one that diverges overshoots it by orders of
    magnitude (``--lr 1e20`` gives 1e20) while staying finite, and would be saved and evaluated at chance."""

    def __init__(self, start: Mapping[str, torch.Tensor] | None = None):
        named = [(k, v) for k, v in (start or {}).items() if v.is_floating_point() and v.numel()]
        self.start = dict(zip((k for k, _ in named), largest_values([v for _, v in named])))

    def check(self, named: list[tuple[str, torch.Tensor]], what: str) -> None:
        """A :class:`NonFiniteError` naming the first tensor of ``named`` that is not finite or over its bound."""
        tensors = [(k, v) for k, v in named if v.is_floating_point() and v.numel()]
        largest = largest_values([v for _, v in tensors])
        for (name, _), value in zip(tensors, largest):
            if not math.isfinite(value):
                bad = first_nonfinite(tensors) or f"{name} is not finite"
                raise NonFiniteError(f"not writing {what}: weight {bad}; the checkpoints already written are kept "
                                     f"(lower --lr, or the method's own learning rate)")
            start = self.start.get(name)
            if value > EXPLOSION_FACTOR * max(start or 0.0, 1.0):
                bound = f"{EXPLOSION_FACTOR:.0e} x max(1, {start:.3g}) at the start" if start is not None else \
                    f"{EXPLOSION_FACTOR:.0e}, the bound of a weight made since the start"
                raise NonFiniteError(
                    f"not writing {what}: weight {name} has exploded (largest |value| {value:.3g}, over {bound}); "
                    f"the checkpoints already written are kept (lower --lr, or the method's own learning rate)")
