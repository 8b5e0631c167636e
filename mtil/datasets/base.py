"""What every classification dataset looks like to the rest of mtil."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Subset

from mtil.datasets.tolerant import TolerantDataset
from mtil.errors import UserError

SPLITS = ("train", "test")


class MissingSplit(UserError, KeyError):
    """A split a dataset does not have: a one-line ``UserError`` that is still a ``KeyError`` for older callers."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


@contextlib.contextmanager
def reading_split(split: str) -> Iterator[None]:
    """Label any exception raised inside with the split whose files were being read (see ``split_of``).

    Openers that build a split eagerly (most build ``train`` to learn the class list) wrap it in this, so a
    damaged file is reported with its split; ``TaskData.raw`` does it for every lazily opened split.
    """
    try:
        yield
    except Exception as exc:
        if split_of(exc) is None:
            try:
                exc.mtil_split = split  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # an exception type without a __dict__: no label
                pass
        raise


def split_of(exc: BaseException) -> str | None:
    """The split ``reading_split`` labelled ``exc`` with, or None (e.g. files shared by all splits)."""
    return getattr(exc, "mtil_split", None)


class Transformed(Dataset):
    """Applies ``transform`` to the image of a (PIL image, label) dataset; the raw dataset is built once."""

    def __init__(self, raw: Dataset, transform: Callable | None):
        self.raw = raw
        self.transform = transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int):
        image, label = self.raw[index]
        return (self.transform(image) if self.transform else image), label


@dataclass
class TaskData:
    """A named classification dataset: readable class names, prompt templates, lazily opened splits.

    ``openers`` maps a split name to a function returning a dataset of (PIL image, int label); each split is
    opened once and kept, so repeated evaluations never rescan folders.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    openers: dict[str, Callable[[], Dataset]]
    _opened: dict[str, Dataset] = field(default_factory=dict, repr=False)
    # derived views (few-shot draws, base/new halves; see mtil.datasets.fewshot), built once and kept with the data
    views: dict[Any, "TaskData"] = field(default_factory=dict, repr=False, compare=False)

    def raw(self, split: str) -> Dataset:
        if split not in self.openers:
            raise MissingSplit(f"{self.name} has no {split!r} split (it has {', '.join(self.openers)})")
        if split not in self._opened:
            with reading_split(split):
                self._opened[split] = self.openers[split]()
        return self._opened[split]

    def dataset(self, split: str, transform: Callable | None) -> Dataset:
        return Transformed(self.raw(split), transform)

    def targets(self, split: str) -> list[int]:
        return targets_of(self.raw(split))


def targets_of(dataset: Any) -> list[int]:
    """Labels of a dataset without decoding its images (torchvision keeps them under varying names)."""
    if isinstance(dataset, Subset):
        parent = targets_of(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    if isinstance(dataset, Transformed):
        return targets_of(dataset.raw)
    if isinstance(dataset, TolerantDataset):
        return targets_of(dataset.dataset)
    for attribute in ("targets", "_labels", "y", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    samples = getattr(dataset, "_samples", None) or getattr(dataset, "samples", None)
    if samples is not None:
        return [int(label) for _, label in samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow fallback: decodes every image


def seeded_split(dataset: Dataset, train_fraction: float = 0.8, seed: int = 42) -> dict[str, Dataset]:
    """The seeded random train/test split the MTIL literature uses where a dataset has no official one."""
    n_train = int(round(len(dataset) * train_fraction))
    train, test = torch.utils.data.random_split(
        dataset, [n_train, len(dataset) - n_train], generator=torch.Generator().manual_seed(seed)
    )
    return {"train": train, "test": test}


def readable_list(names: Sequence[str]) -> list[str]:
    return [n.replace("_", " ").strip() for n in names]
