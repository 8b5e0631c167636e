"""Datasets by name: one registry for the MTIL sets, ImageNet, image folders and the built-in benchmark."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mtil.datasets.base import TaskData
from mtil.errors import UserError


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    open: Callable[[Path, bool], TaskData]  # (data location, allow download) -> TaskData
    layout: str  # the on-disk layout expected under --data-location, for error messages
    downloadable: bool = True


REGISTRY: dict[str, DatasetEntry] = {}
# Parametrised names such as ImageNetSubset:1000, matched by pattern: (regex, factory(match) -> entry)
PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], DatasetEntry]]] = []
_OPEN: dict[tuple[str, str], TaskData] = {}


def register(name: str, layout: str, downloadable: bool = True):
    def decorator(opener: Callable[[Path, bool], TaskData]):
        REGISTRY[name] = DatasetEntry(name, opener, layout, downloadable)
        return opener
    return decorator


def register_pattern(pattern: str):
    def decorator(factory: Callable[[re.Match], DatasetEntry]):
        PATTERNS.append((re.compile(pattern), factory))
        return factory
    return decorator


def dataset_names() -> list[str]:
    _ensure_loaded()
    return sorted(REGISTRY)


def find_entry(name: str) -> DatasetEntry:
    _ensure_loaded()
    if name in REGISTRY:
        return REGISTRY[name]
    for pattern, factory in PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return factory(match)
    lowered = {n.lower(): n for n in REGISTRY}
    hint = f" (did you mean {lowered[name.lower()]}?)" if name.lower() in lowered else ""
    raise UserError(
        f"unknown dataset {name!r}{hint}; valid names: {', '.join(dataset_names())}, "
        f"ImageNetClasses:N, ImageNetSubset:N, or ImageFolder:PATH"
    )


def open_dataset(name: str, location: str | Path = "data", download: bool = False) -> TaskData:
    """Open a dataset by name (once per process); missing files become a one-line UserError."""
    entry = find_entry(name)
    key = (name, str(Path(location).resolve()))
    if key not in _OPEN:
        try:
            data = entry.open(Path(location), download)
            # Touch the test split now, so missing data is reported here and not deep inside a loop.
            if len(data.raw("test")) == 0:
                raise UserError(f"{name} under {location} has no test images (expected {entry.layout})")
        except UserError:
            raise
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            how = (" Pass --download to let torchvision fetch it, or place the files by hand."
                   if entry.downloadable and not download else "")
            if download and entry.downloadable:
                how = f" The download failed ({str(exc)[:100]}): place the files by hand."
            raise UserError(
                f"{name} data not found under {location}: expected {entry.layout}.{how}"
            ) from None
        _OPEN[key] = data
    return _OPEN[key]


def _ensure_loaded() -> None:
    """Import the modules whose decorators fill the registry."""
    from mtil.datasets import folders, toy, torchvision_sets  # noqa: F401
