"""The numerical guard: a non-finite loss or gradient never reaches the weights, and non-finite weights are never
written.

A step whose loss (any term) or, in fp32/bf16, whose gradients are not finite either stops the run with a one-line
error (exit code 2; the checkpoints already written stay as they were) or, under ``--skip-nonfinite N``, is skipped
(no optimiser step) up to N times in the run. In fp16 the gradient scaler skips steps with overflowed gradients by
design: those are not errors, only a non-finite loss is.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from mtil.errors import UserError


class NonFiniteError(UserError):
    """A loss, gradient or weight that is NaN or infinite: the run stops before anything is written."""


def finite_flag(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every tensor's 2-norm is finite (one fused norm per group on a GPU, no host sync). A NaN
    or inf makes its tensor's norm non-finite; so do finite values whose squares overflow float32 (a tensor above
    about 1e19): gradients or weights that large have exploded, and count as not finite."""
    tensors = [t.detach() for t in tensors if t is not None and t.is_floating_point()]
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors)])).all()


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return bool(finite_flag(tensors))


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


def check_weights_finite(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``what`` when a weight is NaN or infinite, or has exploded (its 2-norm overflows float32);
    names the first such tensor."""
    if all_finite(state_dict.values()):
        return
    tensors = [(k, v.detach()) for k, v in state_dict.items() if v.is_floating_point()]
    bad = next((k for k, v in tensors if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise NonFiniteError(f"not writing {what}: weight {bad} is not finite; the checkpoints already written are "
                             f"kept")
    name, value = next((k, v) for k, v in tensors if not torch.isfinite(torch.linalg.vector_norm(v.float())))
    raise NonFiniteError(f"not writing {what}: weight {name} has exploded (largest |value| "
                         f"{value.abs().max().item():.3g}: its norm overflows float32); the checkpoints already "
                         f"written are kept (lower --lr)")
