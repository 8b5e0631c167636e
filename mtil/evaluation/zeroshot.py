"""Zero-shot top-1/top-5 evaluation with template-ensemble heads computed once per model state."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from clip.model import CLIP
from torch.utils.data import DataLoader, Subset

from mtil.datasets.base import TaskData
from mtil.datasets.registry import open_dataset
from mtil.evaluation.sampling import balanced_sample
from mtil.models.text import zeroshot_head
from mtil.models.transforms import eval_transform


@dataclass(frozen=True)
class EvalResult:
    dataset: str
    top1: float
    top5: float
    count: int


def autocast_for(device: torch.device):
    """Half-precision matmuls on GPU (as OpenAI's fp16 weights were trained), exact float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


class ZeroShotEvaluator:
    """Evaluates one model on named datasets.

    Datasets, sampled subsets and loaders are built once. Heads depend only on the text encoder, so they are
    cached until :meth:`model_changed` says the weights moved (``text_changed=False`` keeps them, e.g. when only
    the image encoder trains).
    """

    def __init__(self, model: CLIP, *, data_location: str | Path = "data", download: bool = False,
                 batch_size: int = 128, workers: int = 2, max_size: int | None = None, seed: int = 0):
        self.model = model
        self.data_location = data_location
        self.download = download
        self.batch_size = batch_size
        self.workers = workers
        self.max_size = max_size
        self.seed = seed
        self._heads: dict[str, torch.Tensor] = {}
        # Linear heads learned in the image-fc / fc train modes replace the zero-shot head of their dataset.
        self.learned_heads: dict[str, torch.nn.Module] = {}
        self._loaders: dict[str, DataLoader] = {}
        self.heads_built = 0  # counted, so tests can prove the cache works

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_changed(self, text_changed: bool = True) -> None:
        if text_changed:
            self._heads.clear()

    def task(self, name: str) -> TaskData:
        return open_dataset(name, self.data_location, self.download)

    def head(self, name: str) -> torch.Tensor:
        if name not in self._heads:
            task = self.task(name)
            was_training = self.model.training
            self.model.eval()
            with autocast_for(self.device):
                self._heads[name] = zeroshot_head(self.model, task.classnames, task.templates).float()
            self.model.train(was_training)
            self.heads_built += 1
        return self._heads[name]

    def loader(self, name: str) -> DataLoader:
        if name not in self._loaders:
            task = self.task(name)
            dataset = task.dataset("test", eval_transform(self.model.visual.input_resolution))
            if self.max_size is not None and self.max_size < len(dataset):
                dataset = Subset(dataset, balanced_sample(task.targets("test"), self.max_size, self.seed))
            self._loaders[name] = DataLoader(
                dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=False,
            )
        return self._loaders[name]

    @torch.no_grad()
    def evaluate(self, name: str) -> EvalResult:
        learned = self.learned_heads.get(name)
        head = self.head(name) if learned is None else None
        was_training = self.model.training
        self.model.eval()
        correct1 = correct5 = total = 0
        k = min(5, len(self.task(name).classnames))
        for images, labels in self.loader(name):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with autocast_for(self.device):
                features = self.model.encode_image(images)
            features = F.normalize(features.float(), dim=-1)
            logits = features @ head if learned is None else learned(features)
            top = logits.topk(k, dim=1).indices
            hits = top == labels[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            total += labels.numel()
        self.model.train(was_training)
        return EvalResult(name, 100.0 * correct1 / total, 100.0 * correct5 / total, total)
