"""Classification heads: what turns normalised image features into class logits, for one dataset.

A head is a small serialisable module: ``forward(features) -> logits`` and :func:`head_state` /
:func:`head_from_state` for checkpoints (plain tensors and values, read with ``weights_only=True``). Training,
resume, ``--eval-only`` and evaluation all go through this protocol, so a head learned in training is the one
used wherever its dataset is evaluated. Kinds register by name with :func:`register_head`; a new kind (e.g. a
Tip-Adapter cache head) is one class.

``--label-space seen`` classifies a test image among the classes of several datasets with a :class:`UnionHead`
built at evaluation time (never saved): the heads of those datasets side by side. A head says whether and how it
may join one with ``union_logits``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_KINDS: dict[str, type["Head"]] = {}


def register_head(cls: type["Head"]) -> type["Head"]:
    HEAD_KINDS[cls.kind] = cls
    return cls


class Head(nn.Module):
    kind: ClassVar[str] = "head"

    # Names what :meth:`encode` computes, for caches of encoded features: heads with the same id (and the same
    # model) encode alike. A head whose encode differs must give its own.
    feature_id: ClassVar[str] = "clip-image"

    # How this head's logits join a :class:`UnionHead` (``--label-space seen``): "cosine" (plain cosine
    # similarities, which the union puts on CLIP's own scale), "clip" (already CLIP's own logits, s·cos (+ b), as a
    # linear head initialised from the zero-shot head), or None: it cannot join (its own image encoding, or logits
    # on a scale of its own, as Tip-Adapter's cache term). A head that joins must encode as CLIP does.
    union_logits: ClassVar[str | None] = None

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The features :meth:`forward` classifies: CLIP's L2-normalised image features by default. A head that
        needs more (an adapter's features beside the original ones, as Tip-Adapter with the IMO adapter does)
        overrides this; the evaluator calls it inside its autocast."""
        return F.normalize(model.encode_image(images).float(), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def num_classes(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the head needs to be rebuilt (its state dict by default)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Head":  # pragma: no cover - interface
        raise NotImplementedError


@register_head
class ZeroShotHead(Head):
    """CLIP's zero-shot classifier: logits ``f_I(x) . W`` with ``W`` the D x C template-ensemble text features
    (the logit scale is left out: it changes no ranking)."""

    kind = "zeroshot"
    union_logits = "cosine"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().contiguous())

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight

    @classmethod
    def from_tensors(cls, tensors):
        return cls(tensors["weight"])


@register_head
class LinearHead(Head):
    """A linear classifier on normalised image features, initialised from the zero-shot head times s."""

    kind = "linear"
    union_logits = "clip"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))

    @classmethod
    def from_zeroshot(cls, model, classnames: Sequence[str], templates: Sequence[str]) -> "LinearHead":
        from mtil.models.text import zeroshot_head

        from mtil.models.backend import logit_bias

        head = zeroshot_head(model, classnames, templates)  # D x C, normalised columns
        bias = logit_bias(model)  # SigLIP's: the head's logits are the model's own
        bias = None if bias is None else bias.detach().cpu().float().reshape(-1)[0].expand(head.shape[1])
        return cls(model.logit_scale.exp().detach().cpu() * head.T.cpu(), bias).to(head.device)

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    @classmethod
    def from_tensors(cls, tensors):
        return cls(tensors["linear.weight"], tensors["linear.bias"])


def joins_union(head: Head) -> bool:
    """Whether ``head`` may be one part of a :class:`UnionHead`: it says how its logits join, and it encodes images
    as CLIP does (the union encodes each image once, with CLIP's image encoder)."""
    return (type(head).union_logits in ("cosine", "clip") and type(head).encode is Head.encode
            and head.feature_id == Head.feature_id)


class UnionHead(Head):
    """One head over the classes of several datasets (``--label-space seen``): each dataset's classes are their own
    slots, in the order of ``parts`` (class i of dataset A and a same-named class of dataset B are two slots; an
    image's label is its class's slot in its own dataset's block, :meth:`offset` + its class).

    The logits are the parts' logits side by side. Parts must compare: a part whose logits are cosines (the
    zero-shot head) is put on CLIP's own scale, ``scale * cos + bias`` (``scale`` = the model's
    ``logit_scale.exp()``, ``bias`` = SigLIP's logit bias, else 0), which is what a linear head initialised from
    the zero-shot head gives, so a learned head and a zero-shot head of another dataset compete on one scale. When
    every part is zero-shot this changes no ranking within a part. Built at evaluation time, never saved (no
    ``register_head``).
    """

    kind = "union"
    union_logits = None  # a union is not nested

    def __init__(self, parts: Sequence[tuple[str, Head]], scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        names = [name for name, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"a union names a dataset twice: {names}")
        refused = [name for name, head in parts if not joins_union(head)]
        if refused:
            raise ValueError(f"the heads of {', '.join(refused)} cannot join a union of heads "
                             f"({', '.join(type(h).kind for n, h in parts if n in refused)})")
        self.datasets = names
        self.parts = nn.ModuleList([head for _, head in parts])
        self.scale, self.bias = float(scale), float(bias)
        self.sizes = [head.num_classes for _, head in parts]
        self.offsets = {name: sum(self.sizes[:i]) for i, name in enumerate(names)}

    def offset(self, dataset: str) -> int:
        """Where ``dataset``'s slots start."""
        return self.offsets[dataset]

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        blocks = []
        for head in self.parts:
            logits = head(features)
            if type(head).union_logits == "cosine":
                logits = self.scale * logits + self.bias
            blocks.append(logits)
        return torch.cat(blocks, dim=1)


def head_state(head: Head) -> dict[str, Any]:
    """A checkpoint entry: ``{"kind": ..., "tensors": {...}}``."""
    return {"kind": head.kind, "tensors": head.tensors()}


def head_from_state(state: dict[str, Any]) -> Head:
    """The inverse of :func:`head_state`; also reads the bare ``{"linear.weight", "linear.bias"}`` entries of
    checkpoints written before heads had kinds."""
    if not isinstance(state, dict):
        raise ValueError(f"a head entry is {type(state).__name__}, not a dict")
    if "kind" not in state and "linear.weight" in state:
        state = {"kind": "linear", "tensors": state}
    kind = state.get("kind")
    if kind not in HEAD_KINDS or not isinstance(state.get("tensors"), dict):
        raise ValueError(f"unknown head kind {kind!r} (known: {', '.join(HEAD_KINDS)})")
    return HEAD_KINDS[kind].from_tensors(state["tensors"])
