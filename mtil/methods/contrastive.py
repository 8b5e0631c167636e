"""CLIP's own symmetric image-text contrastive loss on a caption dataset (e.g. the built-in ToyCaptions).

Used by ``make demo`` to give a tiny CLIP real zero-shot ability before continual learning starts. A SigLIP model
(open_clip) trains with its own pre-training loss instead: the pairwise sigmoid loss
``-1/B sum_ij log sigmoid(z_ij (t x_i . y_j + b))``, ``z_ij`` = 1 for a matching pair and -1 otherwise, with its
logit bias ``b`` trained beside the scale ``t`` (Zhai et al., 2023).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mtil.datasets.captions import open_caption_dataset
from mtil.engine.method import Method
from mtil.models.text import tokenize
from mtil.models.transforms import train_transform
from mtil.models.backend import encode_text, image_spec, logit_bias, uses_sigmoid_loss
from mtil.registry import register


def _collate(items):
    images, captions = zip(*items)
    return torch.stack(images), list(captions)


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss of a B x B matrix of biased logits whose diagonal holds the matching pairs."""
    signs = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


@register
class Contrastive(Method):
    name = "contrastive"
    summary = "CLIP's image-text loss on a caption dataset (ToyCaptions), e.g. for pre-training"
    train_modes = ("whole",)
    trains_logit_scale = True
    needs_classification_data = False

    def train_items(self, run, task):
        raw = open_caption_dataset(task.name, run.config.data_location)
        return raw, train_transform(image_spec(run.model)), _collate

    def loss(self, run, batch: Any) -> dict[str, torch.Tensor]:
        images, captions = batch
        images = images.to(run.device, non_blocking=True)
        tokens = tokenize(run.model, captions).to(run.device, non_blocking=True)
        image_feats = F.normalize(run.model.encode_image(images), dim=-1)
        text_feats = F.normalize(encode_text(run.model, tokens), dim=-1)
        logits = run.model.logit_scale.exp() * image_feats @ text_feats.T
        if uses_sigmoid_loss(run.model):
            return {"siglip": sigmoid_loss(logits + logit_bias(run.model))}
        targets = torch.arange(len(captions), device=run.device)
        return {"clip": (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2}

    def after_step(self, run) -> None:
        with torch.no_grad():  # CLIP clamps the temperature at 100
            run.model.logit_scale.clamp_(0, 4.6052)
