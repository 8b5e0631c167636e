"""The checks a training run passes before anything is written: lengths and batch sizes, data, and the settings
that depend on the model's structure."""
from __future__ import annotations

import argparse
from typing import Sequence

import torch

from mtil.datasets.captions import CAPTION_DATASETS, open_caption_dataset
from mtil.datasets.fewshot import check_views
from mtil.datasets.registry import check_readable
from mtil.engine.method import Method
from mtil.engine.run import TaskSettings
from mtil.engine.tasks import has_length
from mtil.errors import UserError
from mtil.evaluation.metrics_io import short_name, short_name_clashes
from mtil.models.clip_loading import ModelRecord, build_model
from mtil.models.train_modes import trainable_names
from mtil.parallel import check_batch_sizes


def check_settings(config: argparse.Namespace, datasets: Sequence[str], settings: Sequence[TaskSettings],
                   method: Method, world_size: int) -> None:
    """Batch sizes split over the processes; every task has a length (unless the method trains nothing); no two
    datasets of the run share a short name (the name of their files and table columns)."""
    clashes = short_name_clashes([*datasets, *(config.eval_datasets or [])])
    if clashes:
        first, second = clashes[0]
        raise UserError(f"{first} and {second} would both be called {short_name(first)!r} in the run's files and "
                        f"tables: give one of the folders another name (a symbolic link will do)")
    check_batch_sizes({name: s.batch_size for name, s in zip(datasets, settings)}, world_size)
    for flag, size in type(method).shared_batch_sizes(config).items():
        check_batch_sizes({"": size}, world_size, flag)
    if method.training_free or type(method).sets_task_length(config):
        return
    missing = [name for name, s in zip(datasets, settings) if not has_length(s)]
    if missing:
        raise UserError(f"training needs a length: give --iterations N or --epochs N (or set it per task in "
                        f"--sequence); no length for {', '.join(missing)}")


def check_data(config: argparse.Namespace, datasets: Sequence[str], components: Sequence[Method]) -> None:
    """Every dataset the run reads is there and its first items decode; reference data is there. All the
    problems are reported together."""
    method, problems = components[0], []

    def attempt(check, *args, **kwargs) -> bool:
        try:
            check(*args, **kwargs)
            return True
        except UserError as exc:
            problems.append(str(exc))
            return False

    for name in datasets:
        if method.needs_classification_data:
            if attempt(check_readable, name, config.data_location, config.download, ("train", "test")):
                attempt(check_views, name, config, trained=True)  # few-shot draws, base/new halves
        elif name not in CAPTION_DATASETS:
            problems.append(f"--method {config.method} trains on a caption dataset "
                            f"({', '.join(CAPTION_DATASETS)}), not {name!r}")
        else:
            attempt(open_caption_dataset, name, config.data_location)
    for name in config.eval_datasets or []:
        if name not in datasets and name not in CAPTION_DATASETS:
            if attempt(check_readable, name, config.data_location, config.download, ("test",)):
                attempt(check_views, name, config, trained=False)
    for component in components:
        attempt(component.check_inputs)
    if problems:
        raise UserError("; ".join(dict.fromkeys(problems)))


def check_model(config: argparse.Namespace, arch: ModelRecord, components: Sequence[Method]) -> None:
    """Settings that depend on the model's structure: --freeze patterns, something left to train, and each
    component's own (OGD's tracked weights, LoRA's targets and trainable adapters). They run on twins built on
    the meta device (names and shapes, no memory)."""
    method = components[0]

    def twin() -> torch.nn.Module:
        with torch.device("meta"):  # a fresh one each: a component may modify its own (LoRA injects)
            return build_model(arch)

    if not any(c.trains_instead_of_clip for c in components):
        names = trainable_names(twin(), config.train_mode, config.freeze)  # also checks the --freeze patterns
        head = config.train_mode in ("image-fc", "fc")  # image-fc-fixed's head is frozen
        if not method.training_free and not names and not head:
            raise UserError(f"--train-mode {config.train_mode} with --freeze {','.join(config.freeze or [])} "
                            f"leaves nothing to train")
    for component in components:
        component.check_model(twin())
