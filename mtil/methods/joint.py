"""``--method joint``: multi-task training on every task of the sequence at once, the upper bound on Last.

The tasks still arrive in order and are evaluated after each, but joint training waits: every task but the last
has zero steps, and at the last task it trains on the union of all the tasks' training sets for as many steps as
the whole sequence would have taken (the sum of the tasks' lengths), with the last task's optimiser settings.
So its rows before the last are the zero-shot model's (its Transfer is the zero-shot Transfer), and its last row
is the ceiling that continual methods approach without seeing old data again.

Each image is classified among its own task's classes only (the tasks label different attributes of the same
kind of image, so a union label space would be ill-posed): a batch mixes tasks, and the cross-entropy of each
sample is taken over its task's class prompts.
"""
from __future__ import annotations

import bisect
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtil.datasets.fewshot import task_data
from mtil.engine.method import Method
from mtil.engine.tasks import steps_for
from mtil.models.text import tokenize
from mtil.models.train_modes import LINEAR_HEAD_MODES, TRAIN_MODES, image_features, trains_image, trains_text
from mtil.models.transforms import train_transform
from mtil.models.backend import encode_text, image_spec
from mtil.registry import register


class TaskMixture(Dataset):
    """The training sets of several tasks as one: item ``(image, class index in the union of their classes)``."""

    def __init__(self, parts: list[Dataset], class_counts: list[int]):
        self.parts = parts
        self.ends = torch.tensor([len(p) for p in parts]).cumsum(0).tolist()
        self.offsets = [0] + torch.tensor(class_counts).cumsum(0).tolist()[:-1]

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int):
        part = bisect.bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        image, label = self.parts[part][index - start]
        return image, self.offsets[part] + int(label)


@register
class Joint(Method):
    name = "joint"
    summary = "multi-task training on all tasks at once, at the last task (the Last ceiling; not continual)"
    train_modes = tuple(m for m in TRAIN_MODES if m not in LINEAR_HEAD_MODES)
    train_modes_note = "joint training classifies with each task's class prompts"
    works_with = ()
    supports_distributed = True  # a mean over each rank's equal share of the mixed batch

    def task_steps(self, run, task, steps: int) -> int:
        sequence = run.state.sequence
        if task.name != sequence[-1]:
            return 0
        total = 0
        for name in sequence:
            settings = run.task_settings.get(name, task.settings)
            total += steps_for(settings, len(task_data(run.config, name).raw("train")))
        return total

    def before_task(self, run, task) -> None:
        self._tokens = self._task_of_class = None
        if task.name != run.state.sequence[-1]:
            return
        data = [task_data(run.config, name) for name in run.state.sequence]  # few-shot views under --shots
        template_prompts = [d.templates[0].format(c) for d in data for c in d.classnames]
        self._tokens = tokenize(run.model, template_prompts).to(run.device)
        self._task_of_class = torch.tensor([t for t, d in enumerate(data) for _ in d.classnames], device=run.device)
        self._mixture = TaskMixture([d.raw("train") for d in data], [len(d.classnames) for d in data])

    def train_items(self, run, task):
        if getattr(self, "_tokens", None) is None:
            return super().train_items(run, task)
        return self._mixture, train_transform(image_spec(run.model)), None

    def loss(self, run, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        mode = run.config.train_mode
        features = image_features(run.model, images, with_grad=trains_image(mode))
        with torch.set_grad_enabled(trains_text(mode)):
            text = F.normalize(encode_text(run.model, self._tokens), dim=-1)
        logits = run.model.logit_scale.exp().detach() * features @ text.T
        sample_task = self._task_of_class[labels]
        total = logits.new_zeros(())
        for t in sample_task.unique().tolist():  # each sample competes only with its own task's classes
            rows = sample_task == t
            columns = (self._task_of_class == t).nonzero().squeeze(1)
            local = labels[rows] - columns[0]
            total = total + F.cross_entropy(logits[rows][:, columns], local, label_smoothing=run.config.ls,
                                            reduction="sum")
        return {"ce": total / len(labels)}
