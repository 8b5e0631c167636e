"""The one small interface every training method implements.

The runner calls ``check_model`` once the model is built; the loop calls, in order: ``before_task`` once per task, then per step ``loss`` (named terms, summed by the loop),
``after_backward`` (e.g. gradient projection), ``after_step`` (e.g. weight averaging), and ``after_task`` at the
task's end. ``state_dict``/``load_state_dict`` carry everything a resume needs; on a resume mid-task,
``load_state_dict`` is called *after* ``before_task``, so it overrides what ``before_task`` rebuilt.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset

if TYPE_CHECKING:  # only for type hints: the engine imports methods, not the other way round
    from mtil.engine.run import Run, TaskContext


class Method:
    """Base class: a method overrides the hooks it needs; the defaults do nothing."""

    name = "method"
    trains_logit_scale = False
    needs_classification_data = True

    def __init__(self, config: argparse.Namespace):
        self.config = config

    def train_items(self, run: "Run", task: "TaskContext") -> tuple[Dataset, Callable | None, Callable | None]:
        """(raw dataset, per-item transform, collate_fn) for this task's training stream."""
        from mtil.models.transforms import train_transform

        return task.data.raw("train"), train_transform(run.model.visual.input_resolution), None

    def check_model(self, model: nn.Module) -> None:
        """Called once the run's model is built, before anything is evaluated or written: refuse flags that do not
        fit this model now (a UserError), not at the first task's start."""

    def check_inputs(self) -> None:
        """Called before anything is evaluated or written: refuse missing reference data now (a UserError), so a
        corrected command is not mistaken for a different configuration of a half-started run."""

    def before_task(self, run: "Run", task: "TaskContext") -> None:
        pass

    def extra_modules(self, run: "Run", task: "TaskContext") -> list[nn.Module]:
        """Modules outside CLIP whose trainable parameters the optimiser also updates (e.g. a linear head)."""
        return []

    def loss(self, run: "Run", batch: Any) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, run: "Run") -> None:
        pass

    def after_step(self, run: "Run") -> None:
        pass

    def after_task(self, run: "Run", task: "TaskContext") -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
