"""Weight-space arithmetic shared by the weight-averaging components, WiSE-FT and teachers: named parameter
dicts, copies, blends."""
from __future__ import annotations

import torch


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def clone(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def to_cpu(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {n: t.detach().cpu() for n, t in tensors.items()}


def to_device(tensors: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}


@torch.no_grad()
def load_into(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the model's parameters of the same names (in place: optimisers keep their state)."""
    params = dict(model.named_parameters())
    for name, value in values.items():
        params[name].copy_(value)


@torch.no_grad()
def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``alpha * a + (1 - alpha) * b`` over the names of ``a``."""
    return {n: alpha * a[n] + (1 - alpha) * b[n].to(a[n].device) for n in a}
