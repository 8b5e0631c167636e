"""Text encoding and zero-shot heads."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtil.models.backend import embed_dim, encode_text, pads_freely, raw_tokens


def tokenize(model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """Tokenize with the model's tokenizer to its own context length, truncating long sentences (captions can be
    long), then trim the padding after the batch's longest sentence where that is exact (see :func:`trim_padding`
    and :func:`mtil.models.backend.pads_freely`)."""
    tokens = raw_tokens(model, texts)
    return trim_padding(tokens) if pads_freely(model) else tokens


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` cut after the column of the batch's last end-of-text token (the highest id of each row).

    CLIP's text transformer is causal and reads each sentence's feature at its end-of-text token, so the padding
    after it never reaches the feature: encoding the trimmed tokens gives the same features (clip's encode_text
    slices the positional embedding and the causal mask to the length it gets) at a fraction of the cost; a
    prompt such as "a photo of a cat." is 8 of 77 positions."""
    if tokens.numel() == 0:
        return tokens
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


def encode_texts(model: nn.Module, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features of ``texts`` (no gradient), on the model's device. Sentences are encoded in
    order of length, each batch trimmed to its longest (:func:`trim_padding`), and returned in the given order."""
    device = next(model.parameters()).device
    tokens = raw_tokens(model, texts)
    trim = trim_padding if pads_freely(model) else (lambda batch: batch)
    order = tokens.argmax(dim=-1).argsort(stable=True)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = trim(tokens[order[start:start + batch_size]]).to(device)
            out.append(F.normalize(encode_text(model, batch).float(), dim=-1))
    if not out:
        return torch.empty(0, embed_dim(model), device=device)
    features = torch.cat(out)
    return features[order.argsort().to(device)]


def zeroshot_head(model: nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """D x C head: per class, encode every template, normalise, average, renormalise (CLIP's ensemble)."""
    texts = [template.format(name) for name in classnames for template in templates]
    features = encode_texts(model, texts).view(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1).T.contiguous()
