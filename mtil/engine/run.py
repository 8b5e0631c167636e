"""The objects a training run passes around: the run (model, state, writers) and the task in progress."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from mtil.datasets.base import TaskData
from mtil.engine.precision import autocast
from mtil.engine.state import TrainingState
from mtil.engine.task_start import TaskStartWeights
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.flags import (half_open_unit, label_smoothing, non_negative_float, non_negative_int, positive_float,
                        positive_int)
from mtil.models.clip_loading import ModelRecord
from mtil.models.heads import Head
from mtil.parallel import SINGLE, Parallel

# The per-task settings (a sequence file's task may set them) with their flags' validators, so that a value from a
# file is checked as the flag's is (tests/test_flags.py checks that these are the parser's types).
TASK_SETTING_TYPES: dict[str, Callable[[str], Any]] = {
    "lr": positive_float, "iterations": positive_int, "epochs": positive_int, "batch_size": positive_int,
    "wd": non_negative_float, "beta2": half_open_unit, "ls": label_smoothing, "warmup_length": non_negative_int,
}
TASK_SETTINGS = tuple(TASK_SETTING_TYPES)


@dataclass
class TaskSettings:
    """Per-task optimisation settings: the command line's, overridden by the sequence file's entry."""

    lr: float
    iterations: int | None
    epochs: int | None
    batch_size: int
    wd: float
    beta2: float
    ls: float
    warmup_length: int


@dataclass
class TaskContext:
    name: str
    settings: TaskSettings
    data: TaskData | None = None  # None for caption datasets
    classifier: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None  # None for a task of zero steps
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    total_steps: int = 0
    feature_passes: int = 0  # how often fc mode encoded the training set (once per task)


@dataclass
class Run:
    config: argparse.Namespace
    model: nn.Module
    arch: ModelRecord  # what a checkpoint records as "arch" to rebuild the model
    device: torch.device
    state: TrainingState
    evaluator: ZeroShotEvaluator
    save_dir: Path | None
    log: logging.Logger
    heads: dict[str, Head] = field(default_factory=dict)  # heads learned in training, by dataset
    task: TaskContext | None = None
    # () -> the zero-shot weights as a CPU state dict of parameters (teachers, WiSE references); set by the runner
    zeroshot_state: Callable[[], dict[str, torch.Tensor]] = field(default=lambda: {}, repr=False)
    precision: str = "fp32"  # resolved --precision
    task_settings: dict[str, TaskSettings] = field(default_factory=dict)  # this process's tasks, by dataset
    parallel: Parallel = SINGLE  # this process's rank among the job's processes (mtil.parallel)
    # the trainable weights as the current task began: one copy for every component (mtil.engine.task_start)
    task_start: TaskStartWeights = field(default_factory=TaskStartWeights, repr=False)
    # everything the run records (metric files, trackers): mtil.records.Records; None records nothing
    records: Any = field(default=None, repr=False)

    def task_start_weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights as the current task began, on the training device; the same dict for every caller
        during the task (read-only). Ask in ``before_task``."""
        return self.task_start.get(self.model)

    def autocast(self):
        """The forward passes' arithmetic (``--precision``); weights and summed losses stay float32."""
        return autocast(self.precision, self.device)
