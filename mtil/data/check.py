"""The status of one dataset under a data folder: present, missing or damaged, with its image and class counts.

The dataset is opened the way a run opens it (the registry's opener, ``download=False``), so what ``status`` calls
present is what ``python -m mtil.main`` can read. On top of what opening checks, every listed image file must exist
and be non-empty, the first image of each split must decode, and the image and class counts must be a complete
copy's (:mod:`mtil.data.catalog`): an interrupted extraction is damaged, not present. Only file lists and
annotation files are read (one ``stat`` per image, no decoding beyond the first image of a split), and nothing is
written. torch and torchvision are imported only when a dataset's folder exists.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mtil.data.catalog import CAPTIONS, CATALOG, CC_OUTPUT, GENERATED, DatasetFacts
from mtil.errors import UserError

PRESENT, MISSING, DAMAGED = "present", "missing", "damaged"
ARCHIVE_SUFFIXES = (".tar", ".tgz", ".zip", ".gz", ".tsv")
_SHOWN = 3  # problem files named in a message


@dataclass
class Status:
    name: str
    state: str
    images: dict[str, int] = field(default_factory=dict)  # found, split -> images ("captions" for captions)
    classes: int | None = None
    detail: str = ""  # one line: why it is missing or damaged, or a note on a present one
    where: Path | None = None


def check(name: str, location: str | Path) -> Status:
    """The status of catalog dataset ``name`` under ``location`` (read only)."""
    facts = CATALOG[name]
    location = Path(location)
    if facts.kind == GENERATED:
        return Status(name, PRESENT, detail="generated in memory")
    if facts.kind == CAPTIONS:
        return _check_captions(facts, location)
    return _check_images(facts, location)


# --------------------------------------------------------------------------------------------- image datasets
def _check_images(facts: DatasetFacts, location: Path) -> Status:
    folder = location / facts.folder
    if not folder.is_dir():
        return Status(facts.name, MISSING, detail=f"no folder {folder}", where=folder)
    from mtil.datasets.registry import find_entry  # torch and torchvision: only once something is there

    entry = find_entry(facts.name)
    found: dict[str, int] = {}
    try:
        data = entry.open(location, False)
        splits = {split: data.raw(split) for split in ("train", "test")}
    except Exception as exc:  # not KeyboardInterrupt
        text = _one_line(exc)
        if _is_not_found(exc):
            if not _holds_data(folder):
                return Status(facts.name, MISSING, detail=f"{folder} holds no data files yet", where=folder)
            return Status(facts.name, DAMAGED, detail=f"incomplete: {text}; expected {entry.layout}", where=folder)
        return Status(facts.name, DAMAGED, detail=f"could not be read: {text}", where=folder)
    found = {split: len(dataset) for split, dataset in splits.items()}
    classes = len(data.classnames)
    problems = _file_problems(splits.values())
    problems = (problems or _first_image_problems(splits)) + _count_problems(facts, found, classes)
    if problems:
        return Status(facts.name, DAMAGED, found, classes, "; ".join(problems), folder)
    return Status(facts.name, PRESENT, found, classes, where=folder)


def _is_not_found(exc: BaseException) -> bool:
    """Files absent (torchvision's "Dataset not found", a missing file or folder), not files that fail to parse."""
    if isinstance(exc, FileNotFoundError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, UserError)) and "not found" in text and "corrupt" not in text


def _holds_data(folder: Path) -> bool:
    """Whether ``folder`` holds any file besides downloaded archives (stops at the first such file)."""
    for _, _, files in os.walk(folder):
        if any(not f.startswith(".") and not f.lower().endswith(ARCHIVE_SUFFIXES) for f in files):
            return True
    return False


def _base(dataset):
    """The torchvision dataset under mtil's wrappers (TolerantDataset, the seeded split's Subset)."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def _file_problems(datasets) -> list[str]:
    """Listed image files that are absent or empty (one ``stat`` each; in-memory sets such as CIFAR list none)."""
    from mtil.datasets.tolerant import file_of

    absent, empty, seen = [], [], set()
    for dataset in datasets:
        base = _base(dataset)
        if id(base) in seen:
            continue
        seen.add(id(base))
        for index in range(len(base)):
            path = file_of(base, index)
            if path is None:
                break
            try:
                if os.stat(path).st_size == 0:
                    empty.append(path)
            except OSError:
                absent.append(path)
    problems = []
    if absent:
        problems.append(f"{len(absent):,} listed image files are missing (first: {', '.join(absent[:_SHOWN])})")
    if empty:
        problems.append(f"{len(empty):,} image files are empty (first: {', '.join(empty[:_SHOWN])})")
    return problems


def _first_image_problems(splits: dict) -> list[str]:
    """The first image of each split, decoded strictly (as a run's pre-flight check does)."""
    from PIL import Image

    from mtil.datasets.tolerant import TolerantDataset

    problems = []
    for split, dataset in splits.items():
        if len(dataset) == 0:
            continue
        strict = dataset.dataset if isinstance(dataset, TolerantDataset) else dataset  # no skipping past it
        try:
            item = strict[0]
            image = item[0] if isinstance(item, (tuple, list)) else item
            if isinstance(image, Image.Image):
                image.load()
        except Exception as exc:
            problems.append(f"the first {split} image cannot be decoded ({_one_line(exc)})")
    return problems


def _count_problems(facts: DatasetFacts, found: dict[str, int], classes: int) -> list[str]:
    problems = []
    if facts.seeded:
        total, expected = sum(found.values()), facts.images["all"]
        if total != expected:
            problems.append(f"{total:,} images, a complete copy has {expected:,}")
    else:
        for split, expected in facts.images.items():
            if found.get(split) != expected:
                problems.append(f"{split} {found.get(split, 0):,} images, a complete copy has {expected:,}")
    if facts.classes is not None and classes != facts.classes:
        problems.append(f"{classes} classes, a complete copy has {facts.classes}")
    return problems


# --------------------------------------------------------------------------------------------- captions
def _check_captions(facts: DatasetFacts, location: Path) -> Status:
    candidates = [location / facts.folder / CC_OUTPUT, location / CC_OUTPUT]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return Status(facts.name, MISSING, detail=f"no {candidates[0]} (nor {candidates[1]})", where=candidates[0])
    from mtil.datasets.sentences import conceptual_captions  # pandas: only once the file is there

    try:
        captions = conceptual_captions(location)
    except UserError as exc:
        return Status(facts.name, DAMAGED, detail=_one_line(exc), where=path)
    found = {"captions": len(captions)}
    expected = facts.images["captions"]
    note = "" if len(captions) >= expected else \
        f"{len(captions):,} of the official file's {expected:,} captions (ZSCL uses all it finds)"
    return Status(facts.name, PRESENT, found, detail=note, where=path)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    if isinstance(exc, UserError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
