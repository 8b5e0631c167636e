"""Distillation pieces shared by ZSCL, LwF, LwF-VR and iCaRL: the loss, frozen teachers, reference sentences."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.nn as nn

from mtil.models.backend import encode_text, pads_freely
from mtil.models.text import encode_texts, trim_padding


def distill(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Soft-target distillation ``CE(student / T, softmax(teacher / T)) * T^2``, mean over rows, written as
    ``KL(teacher || student) * T^2``: the same gradients (they differ by the teacher's entropy, a constant), but
    the value is exactly zero when student equals teacher and positive otherwise."""
    t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean() * T * T


def frozen_copy(model: nn.Module) -> nn.Module:
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

    def compute(self, teacher: nn.Module, sentences: Sequence[str] | torch.Tensor,
                context_length: int) -> torch.Tensor:
        with torch.no_grad():
            if isinstance(sentences, torch.Tensor):  # random token ids: wrap in start/end tokens
                device = next(teacher.parameters()).device
                tokens = torch.zeros(len(sentences), context_length, dtype=torch.long)
                length = min(sentences.shape[1], context_length - 2)
                tokens[:, 0] = 49406
                tokens[:, 1:1 + length] = sentences[:, :length]
                tokens[:, 1 + length] = 49407
                tokens = trim_padding(tokens) if pads_freely(teacher) else tokens
                feats = []
                for start in range(0, len(tokens), 256):
                    feats.append(F.normalize(encode_text(teacher, tokens[start:start + 256].to(device)).float(), dim=-1))
                self.features = torch.cat(feats)
            else:
                self.features = encode_texts(teacher, list(sentences))
        self.computations += 1
        return self.features


class TeacherImageFeatures:
    """The frozen teacher's normalised features of reference images, kept by the image's index in the reference
    dataset while the teacher and the reference data stay the same (ZSCL's zero-shot teacher: the whole sequence;
    LwF / iCaRL: one task). Exact because reference images go through the deterministic evaluation transform:
    the same index is the same pixels, so the teacher's forward is needed once per image, not once per draw.

    Part of the method's state (a resume continues with the same rows, so its features are bit-identical to an
    uninterrupted run's). ``encoded`` counts the images the teacher encoded, so tests can prove the saving."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}
        self.encoded = 0

    def clear(self) -> None:
        self.rows = {}

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def lookup(self, teacher: nn.Module, images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Features of ``images`` (their dataset ``indices``): cached rows, the teacher's forward for the rest.
        New rows are not kept here: :meth:`remember` keeps them (under several processes, every rank's rows in the
        batch's draw order, so every rank's cache is the same)."""
        first: dict[int, int] = {}  # each uncached index -> its first position in the batch (encoded once)
        for position, index in enumerate(indices):
            if index not in self.rows:
                first.setdefault(index, position)
        if not first:
            return torch.stack([self.rows[index] for index in indices])
        encoded = F.normalize(teacher.encode_image(images[list(first.values())]).float(), dim=-1)
        self.encoded += len(first)
        if len(first) == len(indices):
            return encoded
        fresh = dict(zip(first, encoded))
        return torch.stack([fresh[index] if index in fresh else self.rows[index] for index in indices])

    def remember(self, indices: list[int], features: torch.Tensor) -> None:
        """Keep the rows of indices not cached yet (the first occurrence of an index drawn twice)."""
        for index, row in zip(indices, features):
            self.rows.setdefault(int(index), row.detach().float().clone())

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.rows:
            return None
        indices = sorted(self.rows)
        return {"indices": torch.tensor(indices, dtype=torch.int64),
                "features": torch.stack([self.rows[i] for i in indices]).cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
        self.rows = {}
        if state:
            self.remember(state["indices"].tolist(), state["features"].to(device))
