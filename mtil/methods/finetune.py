"""Fine-tuning: cross-entropy on the current task in any train mode (the baseline of every comparison)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mtil.engine.method import Method
from mtil.models.heads import LinearHead
from mtil.models.train_modes import LINEAR_HEAD_MODES, LinearHeadClassifier, PromptClassifier, image_features
from mtil.models.transforms import eval_transform
from mtil.models.backend import image_spec
from mtil.registry import register


@register
class Finetune(Method):
    """``L = CE(logits, y; label smoothing)``; logits from class prompts or a linear head, per train mode."""

    name = "finetune"
    summary = "cross-entropy on the current task (the baseline)"
    supports_distributed = True  # the mean CE over each rank's equal share: DDP's average is the global mean's

    def before_task(self, run, task) -> None:
        mode = run.config.train_mode
        if mode in LINEAR_HEAD_MODES:
            if task.name not in run.heads:
                run.heads[task.name] = LinearHead.from_zeroshot(run.model, task.data.classnames,
                                                                task.data.templates)
            head = run.heads[task.name]
            task.classifier = head if mode == "fc" else LinearHeadClassifier(run.model, head, mode)
        else:
            task.classifier = PromptClassifier(run.model, task.data.classnames, task.data.templates[0], mode)

    def extra_modules(self, run, task):
        return [run.heads[task.name]] if task.name in run.heads else []

    def train_items(self, run, task):
        if run.config.train_mode != "fc":
            return super().train_items(run, task)
        # The engine asks twice per task (to size it, then to stream it): encode the images only the first time.
        if getattr(self, "_features_of", None) is not task:
            self._features, self._features_of = self._cached_features(run, task), task
        return self._features, None, None

    def after_task(self, run, task) -> None:
        self._features = self._features_of = None  # free the cached features

    @torch.no_grad()
    def _cached_features(self, run, task) -> TensorDataset:
        """fc mode: the image encoder is frozen, so every training image is encoded once per task."""
        images = task.data.dataset("train", eval_transform(image_spec(run.model)))
        loader = DataLoader(images, batch_size=run.config.batch_size_eval, num_workers=run.config.workers)
        was_training = run.model.training
        run.model.eval()
        features, labels = [], []
        for x, y in loader:
            features.append(image_features(run.model, x.to(run.device), with_grad=False).cpu())
            labels.append(y)
        run.model.train(was_training)
        task.feature_passes += 1
        return TensorDataset(torch.cat(features), torch.cat(labels))

    def loss(self, run, batch: Any) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        inputs, labels = inputs.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        logits = run.task.classifier(inputs)
        return {"ce": F.cross_entropy(logits, labels, label_smoothing=run.config.ls)}
