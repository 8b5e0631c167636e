"""Distillation pieces shared by ZSCL, LwF, LwF-VR and iCaRL: the loss, frozen teachers, reference sentences."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from clip.model import CLIP

from mtil.models.text import encode_texts, trim_padding


def distill(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Soft-target distillation ``CE(student / T, softmax(teacher / T)) * T^2``, mean over rows, written as
    ``KL(teacher || student) * T^2``: the same gradients (they differ by the teacher's entropy, a constant), but
    the value is exactly zero when student equals teacher and positive otherwise."""
    t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean() * T * T


def frozen_copy(model: CLIP) -> CLIP:
    """A teacher: a deep copy with no gradients, in eval mode."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


def random_token_sentences(count: int, length: int = 10, seed: int = 0, vocab_size: int = 49408) -> torch.Tensor:
    """Token ids of ``count`` random 'sentences' of ``length`` tokens between start and end tokens (LwF-VR).

    Returned as a token tensor, ready for ``encode_text`` (CLIP's start/end ids are 49406/49407).
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size - 2, (count, length), generator=generator)


class SentenceFeatures:
    """Teacher features of the reference sentences, computed once per teacher (the original re-encoded every
    caption at every step). ``computations`` counts the encodings, so tests can prove it."""

    def __init__(self) -> None:
        self.features: torch.Tensor | None = None
        self.computations = 0

    def compute(self, teacher: CLIP, sentences: Sequence[str] | torch.Tensor, context_length: int) -> torch.Tensor:
        with torch.no_grad():
            if isinstance(sentences, torch.Tensor):  # random token ids: wrap in start/end tokens
                device = next(teacher.parameters()).device
                tokens = torch.zeros(len(sentences), context_length, dtype=torch.long)
                length = min(sentences.shape[1], context_length - 2)
                tokens[:, 0] = 49406
                tokens[:, 1:1 + length] = sentences[:, :length]
                tokens[:, 1 + length] = 49407
                tokens = trim_padding(tokens)
                feats = []
                for start in range(0, len(tokens), 256):
                    feats.append(F.normalize(teacher.encode_text(tokens[start:start + 256].to(device)).float(), dim=-1))
                self.features = torch.cat(feats)
            else:
                self.features = encode_texts(teacher, list(sentences))
        self.computations += 1
        return self.features
