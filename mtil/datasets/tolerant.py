"""Datasets that survive a damaged image mid-run: ``TolerantImageFolder`` for image folders, ``TolerantDataset``
around the torchvision sets.

A truncated, zero-byte, missing or undecodable file, or a decompression bomb (PIL refuses images over twice
``Image.MAX_IMAGE_PIXELS``), would otherwise raise in the middle of training or evaluation, hours in, and again on
every re-run. Here the item is replaced by the next readable one of the same split (deterministically: the same
file is always replaced by the same item, so exact resume holds), and each skipped file is reported once per
process on stderr with its path and the count so far. A split with no readable image at all is a one-line error.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from mtil.errors import UserError

UNREADABLE = (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError)


def first_readable(get: Callable[[int], tuple[Any, int]], length: int, index: int, file_of: Callable[[int], str],
                   skipped: set[str], where: str) -> tuple[Any, int]:
    """``get(index)``, or the next readable item after it (wrapping around), its pixels decoded so that a
    damaged file is met here and not later in a transform; each unreadable file is named once."""
    for offset in range(length):
        position = (index + offset) % length
        try:
            image, label = get(position)
            if isinstance(image, Image.Image):
                image.load()
            return image, label
        except UNREADABLE as exc:
            name = file_of(position)
            if name not in skipped:
                skipped.add(name)
                print(f"mtil: warning: skipped unreadable image {name} ({type(exc).__name__}: {str(exc)[:80]}); "
                      f"{len(skipped)} skipped in {where} so far", file=sys.stderr)
    raise UserError(f"no image under {where} could be read ({len(skipped)} unreadable files)")


class TolerantImageFolder(ImageFolder):
    """``ImageFolder`` whose unreadable files are skipped (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: set[str] = set()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return first_readable(super().__getitem__, len(self.samples), index, lambda i: self.samples[i][0],
                              self.skipped, self.root)


def file_of(dataset: Any, index: int) -> str | None:
    """The file behind item ``index`` of a torchvision dataset, where it keeps a file list (for messages)."""
    while isinstance(dataset, (Subset, TolerantDataset)):
        if isinstance(dataset, TolerantDataset):
            dataset = dataset.dataset
            continue
        if len(dataset.indices) <= index:
            return None
        index, dataset = int(dataset.indices[index]), dataset.dataset
    for attribute in ("samples", "_samples", "_image_files", "imgs"):
        files = getattr(dataset, attribute, None)
        if isinstance(files, (list, tuple)) and len(files) > index:
            entry = files[index]
            return str(entry[0] if isinstance(entry, (tuple, list)) else entry)
    return None


class TolerantDataset(Dataset):
    """A torchvision dataset (or a split of one) whose unreadable images are skipped (see the module docstring);
    its other attributes (``classes``, ``_image_files`` ...) are the wrapped dataset's."""

    def __init__(self, dataset: Dataset, where: str):
        self.dataset = dataset
        self.where = where
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return first_readable(self.dataset.__getitem__, len(self), index,
                              lambda i: file_of(self.dataset, i) or f"item {i}", self.skipped, self.where)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "where", "skipped") or name.startswith("__"):  # unpickling: not yet set
            raise AttributeError(name)
        return getattr(self.dataset, name)
