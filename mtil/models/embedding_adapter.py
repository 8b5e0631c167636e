"""Residual low-rank adapters on CLIP's final, L2-normalised embeddings, and the head that evaluates with them.

``e' = normalize(e + scaling · B(A(e)))`` with ``A: D -> r`` and ``B: r -> D`` (no biases), ``B`` zero-initialised,
so a fresh adapter returns its (already normalised) input: CLIP's outputs are unchanged at the start. The result is
re-normalised because everything downstream (cosine logits, the zero-shot head protocol, the temperature) assumes
unit vectors; without it the adapter could also learn per-sample norms, which a cosine classifier cannot read.

:class:`EmbeddingAdapterHead` is a serialisable head (kind ``embedding-adapter``): ``encode`` applies the image
adapter to CLIP's normalised image features, ``forward`` multiplies by ``weight``, the adapted template-ensemble
class text features (D x C). During training its ``weight`` is refreshed lazily from a source the method attaches
(so mid-task evaluations and checkpoints see the current adapter); saved, it is plain tensors.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtil.models.heads import Head, register_head

MAX_LOG_SCALE = math.log(100.0)  # CLIP's clamp of the temperature (logit scale at most 100)


class ResidualLowRank(nn.Module):
    """``x -> normalize(x + scaling · up(down(x)))``; ``up`` starts at zero (identity on unit vectors)."""

    def __init__(self, dim: int, rank: int, scaling: float, generator: torch.Generator | None = None):
        super().__init__()
        self.scaling = float(scaling)
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        with torch.no_grad():
            # nn.Linear's own initialisation of A (kaiming-uniform, a = sqrt(5)), drawn from ``generator`` so that
            # building an adapter leaves the global random streams alone; B = 0.
            bound = 1.0 / math.sqrt(dim)
            self.down.weight.copy_(torch.rand(rank, dim, generator=generator) * 2 * bound - bound)
            self.up.weight.zero_()

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(self.down.weight.dtype)
        return F.normalize(x + self.scaling * self.up(self.down(x)), dim=-1)


class EmbeddingAdapter(nn.Module):
    """The trained part of ``--method embedding-adapter``: an image adapter, a text adapter (either may be absent,
    per ``--train-mode``) and a learnable temperature ``log_scale`` (``exp`` of it scales the logits)."""

    def __init__(self, dim: int, rank: int, scaling: float, log_scale: float, image: bool = True,
                 text: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.image = ResidualLowRank(dim, rank, scaling, generator) if image else None
        self.text = ResidualLowRank(dim, rank, scaling, generator) if text else None
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale)))

    def adapt_image(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.image is None else self.image(features)

    def adapt_text(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.text is None else self.text(features)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=MAX_LOG_SCALE).exp()


def adapted_class_weight(adapter: EmbeddingAdapter, template_features: torch.Tensor) -> torch.Tensor:
    """D x C head weight from C x T x D normalised per-template text features: adapt each prompt's embedding (the
    adapter was trained on single prompts), average over templates, renormalise (CLIP's ensemble)."""
    adapted = adapter.adapt_text(template_features.float())
    return F.normalize(adapted.mean(dim=1), dim=-1).T.contiguous()


@register_head
class EmbeddingAdapterHead(Head):
    """Cosine classifier on adapted embeddings: ``encode`` = image adapter on CLIP's normalised image features,
    ``forward`` = ``features @ weight`` (the temperature is left out, as in the zero-shot head: it changes no
    ranking)."""

    kind = "embedding-adapter"

    def __init__(self, weight: torch.Tensor, image_adapter: ResidualLowRank | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.image_adapter = image_adapter
        self._source: Callable[[], torch.Tensor | None] | None = None  # training only; never saved

    def attach_source(self, source: Callable[[], torch.Tensor | None] | None) -> None:
        """``source()`` returns a fresh weight when the adapter changed since it last answered, else None."""
        self._source = source

    def refresh(self) -> None:
        if self._source is not None:
            with torch.no_grad():
                weight = self._source()
            if weight is not None:
                self.weight = weight.detach().float().contiguous().to(self.weight.device)

    @property
    def feature_id(self) -> str:  # encoded features depend on the image adapter's values
        if self.image_adapter is None:
            return "clip-image"
        digest = hashlib.sha1()
        for tensor in (self.image_adapter.down.weight, self.image_adapter.up.weight):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return f"embedding-adapter:{self.image_adapter.scaling}:{digest.hexdigest()[:16]}"

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(model.encode_image(images).float(), dim=-1)
        return features if self.image_adapter is None else self.image_adapter(features)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.refresh()
        return features.float() @ self.weight

    def tensors(self) -> dict[str, torch.Tensor]:
        self.refresh()
        out = {"weight": self.weight.detach().cpu().clone()}
        if self.image_adapter is not None:
            out["image.down"] = self.image_adapter.down.weight.detach().cpu().clone()
            out["image.up"] = self.image_adapter.up.weight.detach().cpu().clone()
            out["image.scaling"] = torch.tensor(self.image_adapter.scaling, dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "EmbeddingAdapterHead":
        weight = tensors["weight"]
        adapter = None
        if "image.down" in tensors:
            down, up = tensors["image.down"], tensors["image.up"]
            if down.dim() != 2 or up.shape != (down.shape[1], down.shape[0]) or down.shape[1] != weight.shape[0]:
                raise ValueError(f"embedding-adapter head: adapter shapes {tuple(down.shape)}, {tuple(up.shape)} do "
                                 f"not fit a {weight.shape[0]}-dimensional head")
            adapter = ResidualLowRank(down.shape[1], down.shape[0], float(tensors["image.scaling"]))
            with torch.no_grad():
                adapter.down.weight.copy_(down)
                adapter.up.weight.copy_(up)
            adapter.requires_grad_(False)
        return cls(weight, adapter)
