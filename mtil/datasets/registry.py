"""Datasets by name: one registry for the MTIL sets, ImageNet, image folders and the built-in benchmark."""
from __future__ import annotations

import http.client
import re
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from mtil.datasets.base import MissingSplit, TaskData, reading_split, split_of
from mtil.datasets.tolerant import TolerantDataset, file_of
from mtil.errors import UserError
from mtil.flags import did_you_mean


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    open: Callable[[Path, bool], TaskData]  # (data location, allow download) -> TaskData
    layout: str  # the on-disk layout expected under --data-location, for error messages
    downloadable: bool = True
    root: Path | None = None  # where the files are when not under --data-location (ImageFolder:PATH)


REGISTRY: dict[str, DatasetEntry] = {}
# Parametrised names such as ImageNetSubset:1000, matched by pattern: (regex, factory(match) -> entry)
PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], DatasetEntry]]] = []
_OPEN: dict[tuple[str, str], TaskData] = {}

# Evaluation sets of the original MTIL/ZSCL code that mtil does not build in (its name -> full name; matched
# ignoring case, "-" and "_"): find_entry tells users to read them as image folders instead.
NOT_BUILT_IN: dict[str, str] = {
    "ImageNetA": "ImageNet-A",
    "ImageNetR": "ImageNet-R",
    "ImageNetSketch": "ImageNet-Sketch",
    "ImageNetV2": "ImageNetV2",
    "ObjectNet": "ObjectNet",
    "YTBB": "YTBB-Robust",
    "ImageNetVidRobust": "ImageNet-Vid-Robust",
    "FMOW": "FMoW-WILDS",
    "IWildCam": "iWildCam-WILDS",
}


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
    full = {_normalised(n): full for n, full in NOT_BUILT_IN.items()}.get(_normalised(name))
    if full is not None:
        raise UserError(
            f"{name} ({full}) is not built into mtil: place its images as PATH/test/<class>/ and use "
            f"ImageFolder:PATH (with PATH/classnames.txt for readable class names, one per line in sorted folder "
            f"order; add PATH/train/<class>/ only to train on it)"
        )
    hint = did_you_mean(name, dataset_names())
    raise UserError(
        f"unknown dataset {name!r}{hint}; valid names: {', '.join(dataset_names())}, "
        f"ImageNetClasses:N, ImageNetSubset:N, ImageFolder:PATH, or CSV:PATH"
    )


def _normalised(name: str) -> str:
    """``ImageNet-R``, ``imagenet_r`` and ``ImageNetR`` alike."""
    return re.sub(r"[\s_-]", "", name).lower()


def open_dataset(name: str, location: str | Path = "data", download: bool = False) -> TaskData:
    """Open a dataset by name (once per process) and list its test split; every failure is a one-line UserError.

    Missing files are reported as "not found" with the expected layout; files that exist but cannot be parsed
    (empty, truncated, not the expected format, unreadable) as "could not be read" with the exception that
    torchvision or PIL raised. Only the file lists are read here: see ``check_readable`` to decode images too.
    """
    entry = find_entry(name)
    key = _cache_key(name, location)
    if key not in _OPEN:
        try:
            data = entry.open(Path(location), download)
            # Touch the test split now, so missing data is reported here and not deep inside a loop.
            with reading_split("test"):
                if len(data.raw("test")) == 0:
                    raise UserError(f"{name} under {_where(entry, location)} has no test images "
                                    f"(expected {entry.layout})")
        except UserError as exc:
            raise _one_line_user_error(exc) from None
        except Exception as exc:  # not KeyboardInterrupt / SystemExit: those are BaseException only
            raise _failure(entry, name, location, download, exc) from None
        _OPEN[key] = data
    return _OPEN[key]


def check_readable(name: str, location: str | Path, download: bool = False,
                   splits: Iterable[str] = ("train", "test")) -> TaskData:
    """Open dataset ``name`` and decode the first item of each split in ``splits``; return the opened TaskData.

    Meant to run before a training or evaluation run writes anything, so that missing files, damaged split files
    (a zero-byte or truncated MNIST file, a broken annotation file) and an undecodable first image are reported
    at once as a one-line UserError naming the dataset, the split and the problem. Only the first image of each
    split is decoded, not every image: a full scan would take as long as an epoch (hours for ImageNet), so a
    damaged image further in is still met only when it is read. For the generated ToyWorld tasks this renders
    one image per split.
    """
    data = open_dataset(name, location, download)
    entry = find_entry(name)
    if len(data.classnames) < 2:  # every prediction would be right: 100 % whatever the model
        raise UserError(f"{name} has {len(data.classnames)} class{'' if len(data.classnames) == 1 else 'es'} "
                        f"({', '.join(data.classnames) or 'none'}): classifying needs two or more (with one, every "
                        f"prediction is right and the accuracy is 100 % whatever the model)")
    for split in splits:
        if split not in data.openers:
            raise MissingSplit(f"{name} has no {split} split (it has {', '.join(data.openers)}); "
                               f"expected {entry.layout}")
        dataset = None
        try:
            with reading_split(split):
                dataset = data.raw(split)
                if len(dataset) == 0:
                    raise UserError(f"{name} {split} split under {_where(entry, location)} has no images: "
                                    f"expected {entry.layout}")
                strict = dataset.dataset if isinstance(dataset, TolerantDataset) else dataset
                item = strict[0]  # the first image decoded strictly: a damaged one is named, not skipped
                image = item[0] if isinstance(item, (tuple, list)) else item
                if isinstance(image, Image.Image):
                    image.load()  # PIL decodes lazily: make it decode the pixels now
        except UserError as exc:
            _OPEN.pop(_cache_key(name, location), None)  # a failure is not cached
            raise _one_line_user_error(exc) from None
        except Exception as exc:
            _OPEN.pop(_cache_key(name, location), None)
            raise _failure(entry, name, location, download, exc, file_of(dataset, 0)) from None
    return data


# --------------------------------------------------------------------------- #
# failure messages
# --------------------------------------------------------------------------- #
# Raised while fetching files: with --download, a failure of these kinds is a failed download, not a bad file.
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror, http.client.HTTPException)
_MAX_DETAIL = 200


def _cache_key(name: str, location: str | Path) -> tuple[str, str]:
    return name, str(Path(location).resolve())


def _where(entry: DatasetEntry, location: str | Path) -> str:
    return str(entry.root if entry.root is not None else location)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _one_line_user_error(exc: UserError) -> UserError:
    text = str(exc)
    return exc if "\n" not in text and "\r" not in text else UserError(_one_line(text))


def _detail(exc: BaseException) -> str:
    """``Type: message`` on one line, shortened."""
    message = _one_line(str(exc))
    if len(message) > _MAX_DETAIL:
        message = message[:_MAX_DETAIL - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _is_missing(exc: BaseException) -> bool:
    """Files absent, as opposed to present but unreadable.

    torchvision checks that its files exist before parsing them and raises ``RuntimeError("Dataset not found...")``
    (CIFAR, Flowers and Caltech say "not found or corrupted": their check includes an md5 sum); a missing folder
    or image is a FileNotFoundError. Anything else (ValueError, EOFError, a RuntimeError from a reshape, PIL's
    UnidentifiedImageError, PermissionError, ...) was raised while reading files that are there.
    """
    if isinstance(exc, FileNotFoundError):
        return True
    return isinstance(exc, RuntimeError) and "not found" in str(exc).lower()


def _failure(entry: DatasetEntry, name: str, location: str | Path, download: bool, exc: BaseException,
             first_file: str | None = None) -> UserError:
    where = _where(entry, location)
    split = split_of(exc)
    downloading = download and entry.downloadable
    if _is_missing(exc) or (downloading and isinstance(exc, _NETWORK_ERRORS)):
        what = "not found or damaged" if "corrupt" in str(exc).lower() else "not found"
        context = ""
        if isinstance(exc, FileNotFoundError):  # torchvision's own existence checks cover the files of all splits
            context = f" ({split} split)" if split else ""
            context += f" (missing {exc.filename})" if exc.filename else ""
        if downloading:
            how = f" The download failed ({_detail(exc)}): place the files by hand."
        elif entry.downloadable:
            how = " Pass --download to let torchvision fetch it, or place the files by hand."
        else:
            how = ""
        return UserError(_one_line(f"{name} data {what} under {where}{context}: expected {entry.layout}.{how}"))
    context = []
    if split:
        context.append(f"{split} split")
    if first_file and first_file not in str(exc):
        context.append(f"first image {first_file}")
    context.append(_detail(exc))
    if isinstance(exc, PermissionError):
        remedy = "make the files readable by this user"
    elif entry.downloadable:
        remedy = "replace the damaged file(s) (e.g. delete them and re-download with --download)"
    else:
        remedy = "replace the damaged file(s) (e.g. copy or download them again)"
    return UserError(_one_line(f"{name} files under {where} could not be read ({', '.join(context)}): "
                               f"expected {entry.layout}; {remedy}"))


def _ensure_loaded() -> None:
    """Import the modules whose decorators fill the registry."""
    from mtil.datasets import csv_images, folders, toy, torchvision_sets  # noqa: F401
