"""GradientTracker: records the gradients of chosen parameters at chosen steps (for OGD, CLIP-AST)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


class GradientTracker:
    """Keeps flattened gradient snapshots of ``names`` taken at the steps in ``steps``.

    Call :meth:`maybe_record` after backward. Snapshots are stored on CPU (optionally in a lower precision) so a
    large model's gradients do not sit on the GPU.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], steps: Iterable[int],
                 dtype: torch.dtype = torch.float32):
        params = dict(model.named_parameters())
        self.names = list(names)
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"no such parameters: {missing[:5]}")
        self.params = {n: params[n] for n in self.names}
        self.steps = set(int(s) for s in steps)
        self.dtype = dtype
        self.snapshots: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.recorded_steps: list[int] = []

    @staticmethod
    def evenly_spaced(count: int, total_steps: int) -> list[int]:
        """``count`` steps spread evenly over ``0 .. total_steps-1`` (fewer if the task is shorter)."""
        if count <= 0 or total_steps <= 0:
            return []
        if count >= total_steps:
            return list(range(total_steps))
        return sorted({int(round(i * (total_steps - 1) / (count - 1))) if count > 1 else 0 for i in range(count)})

    def maybe_record(self, step: int) -> bool:
        if step not in self.steps or step in self.recorded_steps:
            return False
        for name, param in self.params.items():
            grad = param.grad
            flat = torch.zeros(param.numel()) if grad is None else grad.detach().flatten()
            self.snapshots[name].append(flat.to("cpu", self.dtype, copy=True))
        self.recorded_steps.append(step)
        return True

    def stacked(self, name: str) -> torch.Tensor:
        """K x numel matrix of the snapshots of ``name`` (K = steps recorded)."""
        return torch.stack(self.snapshots[name]) if self.snapshots[name] else torch.empty(0)

    def state_dict(self) -> dict:
        return {"recorded_steps": list(self.recorded_steps),
                "snapshots": {n: [t.clone() for t in v] for n, v in self.snapshots.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.recorded_steps = list(state["recorded_steps"])
        self.snapshots = {n: list(v) for n, v in state["snapshots"].items()}
