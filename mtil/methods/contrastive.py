"""CLIP's own symmetric image-text contrastive loss on a caption dataset (e.g. the built-in ToyCaptions).

Used by ``make demo`` to give a tiny CLIP real zero-shot ability before continual learning starts.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mtil.datasets.captions import open_caption_dataset
from mtil.engine.method import Method
from mtil.models.text import tokenize
from mtil.models.transforms import train_transform
from mtil.models.backend import image_spec
from mtil.registry import register


def _collate(items):
    images, captions = zip(*items)
    return torch.stack(images), list(captions)


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
        text_feats = F.normalize(run.model.encode_text(tokens), dim=-1)
        logits = run.model.logit_scale.exp() * image_feats @ text_feats.T
        targets = torch.arange(len(captions), device=run.device)
        return {"clip": (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2}

    def after_step(self, run) -> None:
        with torch.no_grad():  # CLIP clamps the temperature at 100
            run.model.logit_scale.clamp_(0, 4.6052)
