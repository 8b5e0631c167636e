"""Text encoding and zero-shot heads."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from clip import clip as clip_api
from clip.model import CLIP


def tokenize(model: CLIP, texts: Sequence[str]) -> torch.Tensor:
    """Tokenize to the model's own context length, truncating long sentences (captions can be long)."""
    return clip_api.tokenize(list(texts), context_length=model.context_length, truncate=True)


def encode_texts(model: CLIP, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features of ``texts`` (no gradient), on the model's device."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = tokenize(model, texts[start:start + batch_size]).to(device)
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


def zeroshot_head(model: CLIP, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """D x C head: per class, encode every template, normalise, average, renormalise (CLIP's ensemble)."""
    texts = [template.format(name) for name in classnames for template in templates]
    features = encode_texts(model, texts).view(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1).T.contiguous()
