"""The few-shot protocol of the CoOp lineage (CoOp, CLIP-AST, Tip-Adapter) over any registered dataset.

* ``--shots K``: a training task reads K images per class, drawn with ``--fewshot-seed`` from the dataset's
  training split using the labels only (no image is decoded to draw). Each class's draw is a permutation seeded by
  (seed, class): the first K images are the shots and the next ``min(K, 4)`` the validation images, so the two are
  disjoint, every class gets exactly as many, and the draw of a class does not depend on which other classes are
  drawn (base classes get the same shots with or without ``--base-new``; K shots are the first K of K + 1's).
  A class with fewer than ``K + min(K, 4)`` training images is a one-line error.
* ``--base-new``: the classes are split in halves as CoOp does (the first ``ceil(n / 2)`` class indices are base,
  the rest new); training reads base classes only, and each dataset is evaluated on its base classes and on its
  new classes (each among its own half's class prompts), with the harmonic mean ``HM = 2 B N / (B + N)``.

A *view* is a :class:`TaskData` for one part (``all``, ``base`` or ``new``): its class names are the part's, its
labels are renumbered from 0, ``train`` holds the shots (every image of the part's classes without ``--shots``),
``val`` the validation images (only with ``--shots``) and ``test`` the test images of the part's classes.
Validation is always drawn from the training split, never a dataset's own ``val/`` folder (an image folder without
``test/`` evaluates on ``val/``, so selecting on it would select on the test images).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from mtil.datasets.base import TaskData
from mtil.errors import UserError

VAL_SHOTS_MAX = 4  # validation images per class: min(K, 4), as the CoOp-lineage papers use
PARTS = ("all", "base", "new")


@dataclass(frozen=True)
class FewShot:
    """The protocol a run's flags ask for: ``shots`` per class (None: every image), the draw's ``seed``, and
    whether training reads the base classes only."""

    shots: int | None = None
    seed: int = 1
    base_new: bool = False

    @property
    def training_part(self) -> str:
        return "base" if self.base_new else "all"

    @property
    def val_shots(self) -> int | None:
        return None if self.shots is None else min(self.shots, VAL_SHOTS_MAX)

    def describe(self) -> str:
        parts = [f"{self.shots} shot{'s' if self.shots != 1 else ''} per class (seed {self.seed}, validation "
                 f"{self.val_shots} per class)"
                 if self.shots is not None else "every training image"]
        if self.base_new:
            parts.append("base-to-new (train on the first half of the classes)")
        return ", ".join(parts)


def protocol_of(config: argparse.Namespace) -> FewShot | None:
    """The protocol of a run's flags, or None when it uses none (``--shots`` and ``--base-new`` absent)."""
    shots, base_new = getattr(config, "shots", None), bool(getattr(config, "base_new", False))
    if shots is None and not base_new:
        return None
    return FewShot(shots, int(getattr(config, "fewshot_seed", 1)), base_new)


def split_classes(count: int) -> tuple[list[int], list[int]]:
    """Base and new class indices: the first ``ceil(count / 2)`` and the rest (CoOp's split)."""
    half = math.ceil(count / 2)
    return list(range(half)), list(range(half, count))


def harmonic_mean(base: float, new: float) -> float:
    """``2 B N / (B + N)``; 0 when both are 0."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def draw_shots(targets: Sequence[int], shots: int, seed: int, classes: Sequence[int],
               val_shots: int = 0, where: str = "the dataset",
               classnames: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """(shot indices, validation indices) into ``targets``: ``shots`` and then ``val_shots`` per class of
    ``classes``, disjoint, each class drawn by a permutation seeded by (seed, class). Sorted (reads in file order).
    Raises a one-line UserError naming the classes that have too few images."""
    members: dict[int, list[int]] = {int(c): [] for c in classes}
    for index, label in enumerate(targets):
        if int(label) in members:
            members[int(label)].append(index)
    need = shots + val_shots
    short = [(c, len(m)) for c, m in members.items() if len(m) < need]
    if short:
        named = ", ".join(f"{classnames[c] if classnames else c} ({n})" for c, n in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        fewest = min(n for _, n in short)
        largest = max((k for k in range(1, shots + 1) if k + min(k, val_shots) <= fewest), default=0)
        hint = f"use --shots {largest} or less, or add images" if largest else "add images to these classes"
        raise UserError(f"--shots {shots} needs {need} training images per class of {where} ({shots} shots + "
                        f"{val_shots} validation), but {len(short)} class(es) have fewer: {named}{more}; {hint}")
    train: list[int] = []
    val: list[int] = []
    for label, indices in members.items():
        order = np.random.default_rng([seed, label]).permutation(len(indices))
        train += [indices[i] for i in order[:shots]]
        val += [indices[i] for i in order[shots:need]]
    return sorted(train), sorted(val)


class ClassSubset(Dataset):
    """Items ``indices`` of ``dataset`` with labels renumbered by ``label_map``; ``targets`` without decoding.

    A tolerant dataset may hand back the next readable item in place of a damaged one, which can be of a class
    outside this subset: then the next item of the subset is taken instead (deterministic, as the tolerance is).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], label_map: dict[int, int],
                 parent_targets: Sequence[int]):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.label_map = dict(label_map)
        self.targets = [self.label_map[int(parent_targets[i])] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.indices)):
            image, label = self.dataset[self.indices[(index + offset) % len(self.indices)]]
            if int(label) in self.label_map:
                return image, self.label_map[int(label)]
        raise UserError(f"no readable image of these classes in {getattr(self.dataset, 'where', 'the dataset')}")


def _part_classes(count: int, part: str) -> list[int]:
    if part == "all":
        return list(range(count))
    base, new = split_classes(count)
    return base if part == "base" else new


def view(data: TaskData, protocol: FewShot, part: str) -> TaskData:
    """The ``part`` (all, base, new) of ``data`` under ``protocol`` (see the module docstring); built once per
    dataset, protocol and part (kept on ``data``), its splits opened lazily like the dataset's own."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    key = (protocol, part)
    if key in data.views:
        return data.views[key]
    classes = _part_classes(len(data.classnames), part)
    if not classes:
        raise UserError(f"--base-new splits the classes of {data.name} in halves, but it has only "
                        f"{len(data.classnames)} class: base-to-new needs at least 2")
    label_map = {c: i for i, c in enumerate(classes)}
    draws: dict[str, list[int]] = {}

    def drawn(split: str) -> list[int]:
        if not draws:
            targets = data.targets("train")
            if protocol.shots is None:
                draws["train"], draws["val"] = [i for i, t in enumerate(targets) if int(t) in label_map], []
            else:
                draws["train"], draws["val"] = draw_shots(targets, protocol.shots, protocol.seed, classes,
                                                          protocol.val_shots, data.name, data.classnames)
        return draws[split]

    def training(split: str):
        return lambda: ClassSubset(data.raw("train"), drawn(split), label_map, data.targets("train"))

    def test():
        raw = data.raw("test")
        if part == "all":
            return raw
        targets = data.targets("test")
        return ClassSubset(raw, [i for i, t in enumerate(targets) if int(t) in label_map], label_map, targets)

    openers = {"test": test}
    if "train" in data.openers:
        openers["train"] = training("train")
        if protocol.shots is not None:
            openers["val"] = training("val")
    data.views[key] = TaskData(data.name, [data.classnames[c] for c in classes], data.templates, openers)
    return data.views[key]


def open_view(name: str, location: str | Path, download: bool, protocol: FewShot | None,
              part: str = "all") -> TaskData:
    """Dataset ``name`` (opened once per process) seen through ``protocol``; itself without one."""
    from mtil.datasets.registry import open_dataset

    data = open_dataset(name, location, download)
    if protocol is None:
        if part != "all":
            raise ValueError(f"the {part} classes of {name} need a protocol with base_new")
        return data
    return view(data, protocol, part)


def task_data(config: argparse.Namespace, name: str) -> TaskData:
    """The dataset a training task of this run reads: its few-shot (or base) view when the flags ask for one."""
    protocol = protocol_of(config)
    part = protocol.training_part if protocol is not None else "all"
    return open_view(name, config.data_location, config.download, protocol, part)


def check_views(name: str, config: argparse.Namespace, trained: bool) -> None:
    """Draw now what the run will read of ``name`` (labels only): the shots and validation images of a dataset it
    trains, the test images of each part it evaluates; too few images per class, or a part without test images, is
    a one-line error before anything is written."""
    protocol = protocol_of(config)
    if protocol is None:
        return
    for part in ("base", "new") if protocol.base_new else ("all",):
        seen = view(open_view(name, config.data_location, config.download, None), protocol, part)
        if len(seen.raw("test")) == 0:
            raise UserError(f"{name} has no test images of its {part} classes")
        if trained and part == protocol.training_part:
            seen.raw("train")
            if "val" in seen.openers:
                seen.raw("val")
