"""iCaRL for CLIP: an exemplar memory within a fixed budget, filled by herding, and distillation on it.

The memory holds at most ``--memory-size`` images over all past tasks: after each task every old task's share
shrinks to ``memory_size // tasks_so_far`` (keeping its herding order, so the best exemplars stay) and the new task
fills its share by herding. Exemplars are kept as (dataset, index) references, never as pixels. The loss is the
current task's cross-entropy plus distillation on a batch of exemplars, the teacher being the model from the end
of the previous task (``--icarl-teacher previous``) or the zero-shot model (``zeroshot``), over the class
prompts of the remembered tasks.

Several processes: each rank encodes a contiguous run of the selection's batches (the batches one process would
form), the features are gathered in order on every rank, and rank 0's herding result is broadcast, so every rank
holds the same memory.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Subset

from mtil.datasets.fewshot import task_data
from mtil.engine.weights import load_into
from mtil.flags import add_flag, positive_int
from mtil.methods.distillation import frozen_copy
from mtil.methods.reference_distillation import ReferenceDistillation
from mtil.models.transforms import eval_transform
from mtil.models.backend import image_spec
from mtil.registry import register


@torch.no_grad()
def herding(features: torch.Tensor, count: int) -> list[int]:
    """Greedy herding: repeatedly pick the item that keeps the running mean of the chosen (normalised) features
    closest to the mean of all features. Deterministic given the features."""
    features = F.normalize(features.float(), dim=-1)
    target = features.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    for k in range(1, min(count, len(features)) + 1):
        candidates = (running.unsqueeze(0) + features) / k
        distances = (candidates - target).norm(dim=1)
        distances[~available] = float("inf")
        best = int(distances.argmin())
        chosen.append(best)
        available[best] = False
        running += features[best]
    return chosen


@register
class ICaRL(ReferenceDistillation):
    name = "icarl"
    summary = "an exemplar memory filled by herding, with distillation on it"
    flag_group = ("iCaRL", "The exemplar memory and teacher of iCaRL.")

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--memory-size", type=positive_int, default=2000,
                 help="Exemplars kept over all past tasks.")
        add_flag(group, "--icarl-teacher", default="previous", choices=["previous", "zeroshot"],
                 help="Distillation teacher: the model from the end of the previous task, or the zero-shot model.")

    def __init__(self, config):
        super().__init__(config)
        self.memory: dict[str, list[int]] = {}  # task -> indices into its training split, best first
        self.feature_passes = 0

    def make_teacher(self, run, task):
        teacher = frozen_copy(run.model)
        if self.config.icarl_teacher == "zeroshot":
            load_into(teacher, run.zeroshot_state())
        return teacher

    def reference_images(self, run, task):
        parts = [Subset(task_data(self.config, name).raw("train"), idx)
                 for name, idx in self.memory.items() if idx]
        return ConcatDataset(parts) if parts else None

    def reference_sentences(self, run, task):
        names = list(self.memory) or [task.name]
        sentences = []
        for name in names:
            data = task_data(self.config, name)
            sentences += [data.templates[0].format(c) for c in data.classnames]
        return sentences

    def after_task(self, run, task) -> None:
        super().after_task(run, task)
        budget = self.config.memory_size
        share = budget // (len(self.memory) + (task.name not in self.memory))
        for name in self.memory:
            self.memory[name] = self.memory[name][:share]
        self.memory[task.name] = self._select(run, task, share)
        assert sum(len(v) for v in self.memory.values()) <= budget

    @torch.no_grad()
    def _select(self, run, task, share: int) -> list[int]:
        """Herding per class over batched, no-grad features of the task's training images."""
        features = self._encode_training_images(run, task)
        chosen = self._herd(task, features, share) if run.parallel.is_main else None
        return run.parallel.broadcast(chosen)

    @torch.no_grad()
    def _encode_training_images(self, run, task) -> torch.Tensor:
        """Image features of the task's training images (this rank's batches, gathered in order)."""
        dataset = task.data.dataset("train", eval_transform(image_spec(run.model)))
        size, parallel = self.config.batch_size_eval, run.parallel
        if parallel.distributed:
            batches = parallel.batch_range(-(-len(dataset) // size))
            dataset = Subset(dataset, range(batches.start * size, min(batches.stop * size, len(dataset))))
        loader = DataLoader(dataset, batch_size=size, num_workers=self.config.workers)
        was_training = run.model.training
        run.model.eval()
        features = [run.model.encode_image(x.to(run.device)).float() for x, _ in loader]
        run.model.train(was_training)
        self.feature_passes += 1
        features = torch.cat(features) if features else None
        return parallel.gather_rows(features, matrix=True, device=run.device).cpu()

    @staticmethod
    def _herd(task, features: torch.Tensor, share: int) -> list[int]:
        """Herding per class, the classes interleaved."""
        targets = np.array(task.data.targets("train"))
        classes = np.unique(targets)
        per_class = [share // len(classes) + (1 if i < share % len(classes) else 0) for i in range(len(classes))]
        picks_by_class = []
        for c, quota in zip(classes, per_class):
            members = np.flatnonzero(targets == c)
            order = herding(features[members], quota)
            picks_by_class.append([int(members[i]) for i in order])
        # interleave classes, so that truncating the list later keeps the classes balanced
        chosen = []
        for rank in range(max((len(p) for p in picks_by_class), default=0)):
            chosen += [p[rank] for p in picks_by_class if rank < len(p)]
        return chosen[:share]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": {k: list(v) for k, v in self.memory.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "memory" in state:
            self.memory = {k: list(v) for k, v in state["memory"].items()}
        super().load_state_dict(state)
