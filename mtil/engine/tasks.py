"""Task sequences: comma lists, named orders (MTIL Order I and II, ToyWorld) and YAML sequence files."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtil.engine.run import TASK_SETTINGS, TaskSettings
from mtil.errors import UserError

SEQUENCES_DIR = Path(__file__).resolve().parent.parent / "sequences"
NAMED_ORDERS = {
    "MTIL-I": SEQUENCES_DIR / "mtil_order_1.yaml",
    "MTIL-II": SEQUENCES_DIR / "mtil_order_2.yaml",
    "ToyWorld": SEQUENCES_DIR / "toyworld.yaml",
}


@dataclass(frozen=True)
class TaskSpec:
    dataset: str
    overrides: dict[str, Any] = field(default_factory=dict)


def read_sequence_file(path: str | Path) -> list[TaskSpec]:
    """YAML: ``tasks: [ {dataset: Aircraft, lr: 5.0e-5}, Caltech101, ... ]`` (a bare name has no overrides)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--sequence file {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"--sequence file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    entries = document.get("tasks") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"--sequence file {path} needs a non-empty list under 'tasks:'")
    specs = []
    for number, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            entry = {"dataset": entry}
        if not isinstance(entry, dict) or "dataset" not in entry:
            raise UserError(f"--sequence file {path}: task {number} needs a 'dataset' name")
        overrides = {k: v for k, v in entry.items() if k != "dataset"}
        unknown = sorted(set(overrides) - set(TASK_SETTINGS))
        if unknown:
            raise UserError(f"--sequence file {path}: task {number} sets {unknown}; per-task settings "
                            f"accepted: {', '.join(TASK_SETTINGS)}")
        overrides = {k: _setting(path, number, k, v) for k, v in overrides.items()}
        if overrides.get("iterations") is not None and overrides.get("epochs") is not None:
            raise UserError(f"--sequence file {path}: task {number} sets both iterations and epochs; give one")
        specs.append(TaskSpec(str(entry["dataset"]), overrides))
    return specs


_FLOAT_SETTINGS = ("lr", "wd", "beta2", "ls")
_POSITIVE_SETTINGS = ("lr", "iterations", "epochs", "batch_size")


def _setting(path: Path, number: int, key: str, value: Any) -> Any:
    """A per-task value as the number its flag takes (YAML reads ``5e-5`` as a string), checked like the flag."""
    if value is None:
        return None
    kind = float if key in _FLOAT_SETTINGS else int
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        converted = kind(value)
    except (TypeError, ValueError):
        expected = "a number" if kind is float else "an integer"
        raise UserError(f"--sequence file {path}: task {number} {key}: expected {expected}, got {value!r}") from None
    if converted < 0 or (key in _POSITIVE_SETTINGS and converted == 0):
        limit = "positive" if key in _POSITIVE_SETTINGS else "0 or more"
        raise UserError(f"--sequence file {path}: task {number} {key} must be {limit}, got {value!r}")
    return converted


def resolve_tasks(config: argparse.Namespace) -> list[TaskSpec]:
    if config.sequence:
        return read_sequence_file(config.sequence)
    if not config.train_dataset:
        return []
    if config.train_dataset in NAMED_ORDERS:
        return read_sequence_file(NAMED_ORDERS[config.train_dataset])
    return [TaskSpec(name.strip()) for name in config.train_dataset.split(",") if name.strip()]


def task_settings(config: argparse.Namespace, spec: TaskSpec) -> TaskSettings:
    values = {name: getattr(config, name) for name in TASK_SETTINGS}
    overrides = dict(spec.overrides)
    # A per-task length replaces the command line's, whichever unit either uses.
    if "iterations" in overrides or "epochs" in overrides:
        values["iterations"] = values["epochs"] = None
    values.update(overrides)
    if values["iterations"] is not None and values["epochs"] is not None:
        raise UserError(f"task {spec.dataset}: iterations and epochs both set; give one")
    return TaskSettings(**values)


def steps_for(settings: TaskSettings, dataset_size: int) -> int:
    """Optimiser steps of a task: ``iterations``, or ``epochs`` x ceil(size / batch)."""
    if settings.iterations is not None:
        return int(settings.iterations)
    if settings.epochs is not None:
        return int(settings.epochs) * -(-dataset_size // settings.batch_size)
    raise UserError("training needs a length: give --iterations N or --epochs N (or set it per task in --sequence)")
