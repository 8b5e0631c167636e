"""Task sequences: comma lists, named orders (MTIL Order I and II, ToyWorld) and YAML sequence files."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtil.engine.run import TASK_SETTING_TYPES, TASK_SETTINGS, TaskSettings
from mtil.errors import UserError
from mtil.yaml_files import read_yaml

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
    builtin: bool = False  # from a named order shipped with mtil, not from the user's own --sequence file


def read_sequence_file(path: str | Path, builtin: bool = False) -> list[TaskSpec]:
    """YAML: ``tasks: [ {dataset: Aircraft, lr: 5.0e-5}, Caltech101, ... ]`` (a bare name has no overrides)."""
    path = Path(path)
    document = read_yaml(path, "--sequence file")
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
        unknown = sorted(set(overrides) - set(TASK_SETTINGS), key=str)  # keys may be numbers, dates, null
        if unknown:
            raise UserError(f"--sequence file {path}: task {number} sets {unknown}; per-task settings "
                            f"accepted: {', '.join(TASK_SETTINGS)}")
        overrides = {k: _setting(path, number, k, v, TASK_SETTING_TYPES[k]) for k, v in overrides.items()}
        if overrides.get("iterations") is not None and overrides.get("epochs") is not None:
            raise UserError(f"--sequence file {path}: task {number} sets both iterations and epochs; give one")
        specs.append(TaskSpec(str(entry["dataset"]), overrides, builtin))
    return specs


def _setting(path: Path, number: int, key: str, value: Any, check) -> Any:
    """A per-task value through its flag's own validator (so ``ls: 1.5`` fails as ``--ls 1.5`` does)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"--sequence file {path}: task {number} {key}: expected a number, got {value!r}")
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    try:
        return check(text) if check is not None else value
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"--sequence file {path}: task {number} {key}: {exc}") from None


def resolve_tasks(config: argparse.Namespace) -> list[TaskSpec]:
    if config.sequence:
        return read_sequence_file(config.sequence)
    if not config.train_dataset:
        return []
    if config.train_dataset in NAMED_ORDERS:
        return read_sequence_file(NAMED_ORDERS[config.train_dataset], builtin=True)
    return [TaskSpec(name.strip()) for name in config.train_dataset.split(",") if name.strip()]


def typed_settings(config: argparse.Namespace) -> set[str]:
    """The per-task settings the user set on the command line or in ``--config``."""
    return {k for k in (*getattr(config, "_cli", ()), *getattr(config, "_file", ())) if k in TASK_SETTINGS}


def _beaten(spec: TaskSpec, key: str, typed: set[str]) -> bool:
    """A named order's per-task value gives way to a typed flag (the length counts as one setting)."""
    if not spec.builtin:
        return False
    return key in typed or (key in ("iterations", "epochs") and bool(typed & {"iterations", "epochs"}))


def warmup_chosen(config: argparse.Namespace, spec: TaskSpec) -> bool:
    """Whether the task's warm-up was stated (typed, in --config, in a sequence file or a named order) rather than
    left at the flag's default."""
    return "warmup_length" in typed_settings(config) or "warmup_length" in spec.overrides


def task_settings(config: argparse.Namespace, spec: TaskSpec) -> TaskSettings:
    """The rule, most specific statement of the user first: a task's entry in the user's own ``--sequence``
    file; then a flag typed on the command line (or set in ``--config``); then a named order's per-task value
    (MTIL-I's learning rates: the paper's recipe, never over what the user typed); then the flag's default."""
    values = {name: getattr(config, name) for name in TASK_SETTINGS}
    typed = typed_settings(config)
    overrides = {k: v for k, v in spec.overrides.items() if not _beaten(spec, k, typed)}
    if "iterations" in overrides or "epochs" in overrides:
        values["iterations"] = values["epochs"] = None
    values.update(overrides)
    if values["iterations"] is not None and values["epochs"] is not None:
        raise UserError(f"task {spec.dataset}: iterations and epochs both set; give one")
    return TaskSettings(**values)


def overridden(config: argparse.Namespace, specs: list[TaskSpec]) -> dict[str, list[str]]:
    """setting -> the tasks whose named-order value a typed flag replaced (to print what was applied)."""
    typed = typed_settings(config)
    out: dict[str, list[str]] = {}
    for spec in specs:
        for key in spec.overrides:
            if _beaten(spec, key, typed):
                out.setdefault(key, []).append(f"{spec.dataset} {spec.overrides[key]:g}"
                                               if isinstance(spec.overrides[key], float)
                                               else f"{spec.dataset} {spec.overrides[key]}")
    return out


def has_length(settings: TaskSettings) -> bool:
    return settings.iterations is not None or settings.epochs is not None


def steps_for(settings: TaskSettings, dataset_size: int) -> int:
    """Optimiser steps of a task: ``iterations``, or ``epochs`` x ceil(size / batch)."""
    if settings.iterations is not None:
        return int(settings.iterations)
    if settings.epochs is not None:
        return int(settings.epochs) * -(-dataset_size // settings.batch_size)
    raise UserError("training needs a length: give --iterations N or --epochs N (or set it per task in --sequence)")
