"""Train modes: which CLIP parameters train, and the classifier that turns images into class logits.

| mode           | trains                                                             |
| whole          | both encoders, embeddings and projections (not logit_scale/bias)   |
| image          | the image encoder only; text features are computed once, no grad   |
| text           | the text encoder only; image features computed without gradient    |
| image-fc       | image encoder + a linear head initialised from the zero-shot head x s |
| image-fc-fixed | image encoder; that head frozen                                    |
| fc             | the linear head only (image features computed once per task)       |
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtil.models.backend import encode_text
from mtil.errors import UserError
from mtil.models.heads import LinearHead
from mtil.models.text import tokenize

TRAIN_MODES = ("whole", "image", "text", "image-fc", "image-fc-fixed", "fc")
LINEAR_HEAD_MODES = ("image-fc", "image-fc-fixed", "fc")
CLIP_TRAINING_MODES = tuple(m for m in TRAIN_MODES if m != "fc")  # the modes in which CLIP's own weights train


# The temperature (and SigLIP's logit bias, open_clip) belong to neither encoder: only a method that asks trains them.
LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


def is_image_param(name: str) -> bool:
    return name.startswith("visual.")


def is_text_param(name: str) -> bool:
    return not is_image_param(name) and name not in LOGIT_PARAMETERS


def trains_image(mode: str) -> bool:
    return mode in ("whole", "image", "image-fc", "image-fc-fixed")


def trains_text(mode: str) -> bool:
    return mode in ("whole", "text")


def check_freeze_patterns(model: nn.Module, patterns: Sequence[str] | None) -> None:
    """Every ``--freeze`` pattern must match a parameter of the model (a typo would freeze nothing)."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns or []:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UserError(f"--freeze pattern {pattern!r} matches no parameter (e.g. {names[1]}, {names[-2]})")


def wanted_by_mode(name: str, mode: str, freeze: Sequence[str] | None = None) -> bool:
    """Whether parameter ``name`` trains in ``mode`` with the ``--freeze`` patterns."""
    wanted = (trains_image(mode) and is_image_param(name)) or (trains_text(mode) and is_text_param(name))
    return wanted and not any(fnmatch.fnmatchcase(name, p) for p in freeze or [])


def trainable_names(model: nn.Module, mode: str, freeze: Sequence[str] | None = None) -> list[str]:
    """The CLIP parameters ``mode`` trains (without changing the model)."""
    if mode not in TRAIN_MODES:
        raise UserError(f"--train-mode {mode!r} is not a train mode; accepted: {', '.join(TRAIN_MODES)}")
    check_freeze_patterns(model, freeze)
    return [n for n, _ in model.named_parameters() if wanted_by_mode(n, mode, freeze)]


def select_trainable(model: nn.Module, mode: str, freeze: Sequence[str] | None = None) -> list[str]:
    """Set ``requires_grad`` per the mode (and ``--freeze`` patterns); returns the trainable parameter names."""
    trainable = set(trainable_names(model, mode, freeze))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return [n for n, _ in model.named_parameters() if n in trainable]


def image_features(model: nn.Module, images: torch.Tensor, with_grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        return F.normalize(model.encode_image(images), dim=-1)


class PromptClassifier(nn.Module):
    """Logits ``s * f_I(x) . f_T(prompt_c)`` with the first template's prompts (whole, image, text modes).

    When the text encoder is frozen the class text features are computed once, here, without gradient.
    """

    def __init__(self, model: nn.Module, classnames: Sequence[str], template: str, mode: str):
        super().__init__()
        self.model = model
        self.mode = mode
        device = next(model.parameters()).device
        self.register_buffer("tokens", tokenize(model, [template.format(c) for c in classnames]).to(device),
                             persistent=False)
        self._frozen_text: torch.Tensor | None = None
        if not trains_text(mode):
            with torch.no_grad():
                self._frozen_text = F.normalize(encode_text(model, self.tokens), dim=-1)

    def text_features(self) -> torch.Tensor:
        if self._frozen_text is not None:
            return self._frozen_text
        return F.normalize(encode_text(self.model, self.tokens), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = image_features(self.model, images, with_grad=trains_image(self.mode))
        return self.model.logit_scale.exp().detach() * feats @ self.text_features().T


class LinearHeadClassifier(nn.Module):
    """Image encoder (trainable or not) followed by a :class:`LinearHead` (image-fc, image-fc-fixed modes)."""

    def __init__(self, model: nn.Module, head: LinearHead, mode: str):
        super().__init__()
        self.model, self.head, self.mode = model, head, mode
        head.requires_grad_(mode != "image-fc-fixed")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(image_features(self.model, images, with_grad=trains_image(self.mode)))


def parameters_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
