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
    return torch.isfinite(_norms(tensors)).all()


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's 2-norm in float32 (fused for float32 tensors; a half-precision norm would overflow at 65 504,
    so those are taken in float32 one by one)."""
    wide = [i for i, t in enumerate(tensors) if t.dtype in (torch.float32, torch.float64)]
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    if wide:
        for i, n in zip(wide, torch._foreach_norm([tensors[i] for i in wide])):
            norms[i] = n.float()
    for i, t in enumerate(tensors):
        if norms[i] is None:
            norms[i] = torch.linalg.vector_norm(t, dtype=torch.float32)
    return torch.stack([n.to(norms[0].device) for n in norms])


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
    norms = _norms([v for _, v in tensors])
    index = int((~torch.isfinite(norms)).nonzero()[0, 0])
    name, value = tensors[index]
    return f"{name} has exploded (largest |value| {value.abs().max().item():.3g}: its norm overflows float32)"
