"""The weights a sequence started from, rebuilt from how the run recorded them (its state's ``base``)."""
from __future__ import annotations

import argparse

import torch

from mtil.models.clip_loading import load_clip


class ZeroShotWeights:
    """The zero-shot weights (CPU state dict of parameters), loaded on first use and kept."""

    def __init__(self, spec: dict, config: argparse.Namespace):
        self.spec, self.config, self._weights = spec, config, None

    def __call__(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            spec = self.spec
            model = load_clip(spec["model"], clip_root=spec.get("clip_root") or self.config.clip_root,
                              untrained=spec["untrained"], load=spec["load"], device="cpu", seed=spec["seed"]).model
            self._weights = {n: p.detach() for n, p in model.named_parameters()}
        return self._weights
