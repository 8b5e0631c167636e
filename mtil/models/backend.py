"""The model back-end seam: what mtil asks of a CLIP model, whichever library built it.

Two back-ends: clip-anytorch (``clip.model.CLIP``: OpenAI's names, local files of that architecture, the tiny test
architectures, ``toyclip``) and open_clip (``--model open_clip:ARCH[/PRETRAINED]``, see
:mod:`mtil.models.open_clip_backend`). Both expose ``encode_image``, ``encode_text``, ``logit_scale``, ``visual``
and, for open_clip's native ViT, the same parameter names as OpenAI's CLIP (``visual.transformer.resblocks.<i>.attn``
is an ``nn.MultiheadAttention`` in both), so methods that name parameters (CLIP-AST, OGD, LoRA targets, per-part
learning rates, ``--freeze``) work unchanged. What differs is asked here: the image resolution and normalisation,
the tokenizer and whether trimming padding is exact, SigLIP's logit bias and sigmoid loss.

Code outside ``mtil.models`` reads these facts through this module, never through a back-end's attributes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from mtil.models.transforms import ImageSpec

CLIP_BACKEND = "clip"
OPEN_CLIP_BACKEND = "open_clip"


def backend_name(model: nn.Module) -> str:
    """``"open_clip"`` for a model open_clip built, else ``"clip"`` (clip-anytorch's classes)."""
    return OPEN_CLIP_BACKEND if type(model).__module__.split(".")[0] == "open_clip" else CLIP_BACKEND


def _open_clip():
    from mtil.models import open_clip_backend

    return open_clip_backend


def image_spec(model: nn.Module) -> ImageSpec:
    """The resolution, normalisation and interpolation the model's images need."""
    if backend_name(model) == OPEN_CLIP_BACKEND:
        oc = _open_clip()
        mean, std, interpolation = oc.preprocess(model)
        return ImageSpec(oc.image_resolution(model), tuple(mean), tuple(std), interpolation, oc.resize_mode(model))
    return ImageSpec(int(model.visual.input_resolution))


def image_resolution(model: nn.Module) -> int:
    return image_spec(model).resolution


def raw_tokens(model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """Token ids at the model's full context length (long sentences truncated)."""
    if backend_name(model) == OPEN_CLIP_BACKEND:
        return _open_clip().tokenize(model, list(texts))
    from clip import clip as clip_api

    return clip_api.tokenize(list(texts), context_length=model.context_length, truncate=True)


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` of token ids, also trimmed ones (:func:`mtil.models.text.trim_padding`): open_clip's
    own encode_text takes only the full context length."""
    if backend_name(model) == OPEN_CLIP_BACKEND:
        return _open_clip().encode_text(model, tokens)
    return model.encode_text(tokens)


def pads_freely(model: nn.Module) -> bool:
    """True when the padding after a sentence's end-of-text token never reaches its feature (a causal text
    transformer read at the end-of-text token: OpenAI's CLIP), so padding may be trimmed; False for SigLIP's text
    tower (no causal mask, read at the last position)."""
    if backend_name(model) == OPEN_CLIP_BACKEND:
        return bool(_open_clip().pads_freely(model))
    return True


def logit_bias(model: nn.Module) -> torch.Tensor | None:
    """SigLIP's learned logit bias (added to ``logit_scale.exp() * cos``), or None for a CLIP."""
    if backend_name(model) == OPEN_CLIP_BACKEND:
        return _open_clip().logit_bias(model)
    return None


def uses_sigmoid_loss(model: nn.Module) -> bool:
    """SigLIP: pre-trained with a pairwise sigmoid loss instead of CLIP's softmax contrastive loss."""
    return backend_name(model) == OPEN_CLIP_BACKEND and bool(_open_clip().uses_sigmoid_loss(model))


def embed_dim(model: nn.Module) -> int:
    """The width of the joint image-text embedding."""
    if backend_name(model) == OPEN_CLIP_BACKEND:
        return int(_open_clip().embed_dim(model))
    return int(model.text_projection.shape[1])


def first_image_weight(model: nn.Module) -> torch.Tensor:
    """A parameter of the image tower's input layer: its dtype is the one images are cast to."""
    return next(model.visual.parameters())
