"""Are tensors finite? One fused pass over many tensors, and the name of the first one that is not.

A NaN or inf makes its tensor's 2-norm non-finite; so do finite values whose squares overflow float32 (a tensor
above about 1e19): weights or gradients that large have exploded, and count as not finite.
"""
from __future__ import annotations

from typing import Iterable

import torch


def finite_flag(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every floating tensor's 2-norm is finite (one fused norm per group on a GPU, no host
    sync)."""
    tensors = [t.detach() for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors)])).all()


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return bool(finite_flag(tensors))


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """``name is not finite`` or ``name has exploded (largest |value| X: its norm overflows float32)`` for the
    first floating tensor of ``named`` that is not finite; None when all are (one fused check when all is well,
    a second pass over the tensors only to name the culprit)."""
    tensors = [(k, v.detach()) for k, v in named if isinstance(v, torch.Tensor) and v.is_floating_point()
               and v.numel()]
    if all_finite(v for _, v in tensors):
        return None
    bad = next((k for k, v in tensors if not torch.isfinite(v).all()), None)
    if bad is not None:
        return f"{bad} is not finite"
    name, value = next(((k, v) for k, v in tensors if not torch.isfinite(torch.linalg.vector_norm(v.float()))),
                       tensors[0])
    return f"{name} has exploded (largest |value| {value.abs().max().item():.3g}: its norm overflows float32)"
