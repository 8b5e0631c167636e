"""Tip-Adapter with the IMO adapter: the zero-shot term from CLIP's original image features, the cache affinity
(query and keys) from the IMO-adapted ones.

The adapter's weights live in the head (:class:`IMOFeatures`, plain tensors), not in CLIP: for every batch it is
attached to the image encoder, used for the adapted pass and removed again, so the model, its checkpoints and
every other evaluation stay plain CLIP, and ``--eval-only --load`` of a checkpoint needs nothing but the head.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtil.adapters.tip import TipHead
from mtil.models.heads import Head, register_head
from mtil.models.imo_adapter import add_imo_adapters, has_imo_adapters, imo_adapters, remove_imo_adapters

PREFIX = "imo_"  # buffer names: imo_<layer>_<down|up>_<weight|bias> (a buffer name cannot hold dots)


def _buffer_name(key: str) -> str:
    return PREFIX + key.replace(".", "_")


def _file_key(name: str) -> str:
    layer, part, kind = name[len(PREFIX):].split("_")
    return f"{layer}.{part}.{kind}"


def digest(tensors: Mapping[str, torch.Tensor], scale: float) -> str:
    """A short SHA-256 of the adapter's weights and scale: features adapted by other weights never share a cache."""
    h = hashlib.sha256(repr(float(scale)).encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def attached(model: nn.Module, tensors: Mapping[str, torch.Tensor], scale: float) -> Iterator[None]:
    """``model`` with IMO adapters of these weights (switched on, no dropout) inside the block, plain after."""
    if has_imo_adapters(model):
        raise ValueError("the model already carries IMO adapters; the head attaches its own")
    width = tensors["0.down.weight"].shape[0]
    adapters = add_imo_adapters(model, width=width, scale=scale, dropout=0.0)
    try:
        reference = adapters[0].down.weight
        adapters.load_state_dict({k: v.to(device=reference.device, dtype=reference.dtype) for k, v in tensors.items()})
        for adapter in imo_adapters(model):
            adapter.eval()
        yield
    finally:
        remove_imo_adapters(model)


@register_head
class IMOFeatures(Head):
    """Encodes images as ``[original | IMO-adapted]`` L2-normalised features (2·D columns)."""

    kind = "imo-features"

    def __init__(self, tensors: Mapping[str, torch.Tensor], scale: float):
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(_buffer_name(key), value.detach().float().clone())
        self.register_buffer("imo_scale", torch.tensor(float(scale)))
        self._id = f"clip-image+imo:{digest(tensors, scale)}"

    @property
    def feature_id(self) -> str:  # type: ignore[override]
        return self._id

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {_file_key(n): b for n, b in self.named_buffers() if n.startswith(PREFIX) and n != "imo_scale"}

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        original = F.normalize(model.encode_image(images).float(), dim=-1)
        with attached(model, self.adapter_tensors(), float(self.imo_scale)):
            adapted = F.normalize(model.encode_image(images).float(), dim=-1)
        return torch.cat([original, adapted], dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - an encoder, not a classifier
        raise TypeError("IMOFeatures encodes images; TipIMOHead classifies them")

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any]) -> "IMOFeatures":
        scale = float(tensors["imo_scale"])
        return cls({_file_key(n): v for n, v in tensors.items() if n.startswith(PREFIX) and n != "imo_scale"},
                   scale)


@register_head
class TipIMOHead(TipHead):
    """A :class:`TipHead` (Tip-Adapter, -F or Tip-X) whose features are :class:`IMOFeatures`' two halves."""

    kind = "tip-imo"

    def __init__(self, base: TipHead, imo: IMOFeatures):
        nn.Module.__init__(self)
        for name, buffer in base.named_buffers():
            self.register_buffer(name, buffer)
        self.affinity_split.fill_(True)
        self.imo = imo

    @property
    def feature_id(self) -> str:  # type: ignore[override]
        return self.imo.feature_id

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.imo.encode(model, images)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any]) -> "TipIMOHead":
        imo = {n[len("imo."):]: v for n, v in tensors.items() if n.startswith("imo.")}
        base = TipHead.from_tensors({n: v for n, v in tensors.items() if not n.startswith("imo.")})
        return cls(base, IMOFeatures.from_tensors(imo))
