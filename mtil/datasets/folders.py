"""Folder datasets: ImageNet (and its subsets) and any ``train/ val|validation/ test/`` image folder
(``test/`` alone for a dataset used only for evaluation)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from mtil.datasets.base import TaskData, readable_list, reading_split, targets_of
from mtil.datasets.classnames import IMAGENET_CLASSNAMES
from mtil.datasets.registry import DatasetEntry, register, register_pattern
from mtil.datasets.tolerant import TolerantImageFolder
from mtil.errors import UserError
from mtil.templates import get_templates

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
IMAGENET_LAYOUT = "ImageNet/train/<wnid>/*.JPEG and ImageNet/val/<wnid>/*.JPEG (or ImageNet/val_in_folder/)"


def _first_existing(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _imagenet_folders(root: Path) -> tuple[Path, Path]:
    base = root / "ImageNet"
    train, val = base / "train", _first_existing(base, ("val_in_folder", "val"))
    if not train.is_dir() or val is None:
        raise FileNotFoundError(base)
    return train, val


def _imagenet_names(folder: ImageFolder) -> list[str]:
    # The 1000 readable names follow the sorted-wnid order; a partial copy keeps its folder names.
    return IMAGENET_CLASSNAMES if len(folder.classes) == 1000 else readable_list(folder.classes)


@register("ImageNet", IMAGENET_LAYOUT, downloadable=False)
def imagenet(root: Path, download: bool) -> TaskData:
    train_dir, val_dir = _imagenet_folders(root)
    with reading_split("train"):
        train = ImageFolder(str(train_dir))
    return TaskData("ImageNet", _imagenet_names(train), get_templates("ImageNet"),
                    {"train": lambda: train, "test": lambda: ImageFolder(str(val_dir))})


def _imagenet_subset(name: str, root: Path, pick) -> TaskData:
    full = imagenet(root, False)
    train = full.raw("train")
    indices = pick(targets_of(train))
    return TaskData(name, full.classnames, full.templates,
                    {"train": lambda: Subset(train, indices), "test": full.openers["test"]})


@register_pattern(r"ImageNetSubset:(\d+)")
def imagenet_random_subset(match: re.Match) -> DatasetEntry:
    """N random ImageNet training images (seed 0), e.g. as ZSCL reference images."""
    count = int(match.group(1))

    def pick(targets: list[int]) -> list[int]:
        rng = np.random.default_rng(0)
        return sorted(rng.choice(len(targets), size=min(count, len(targets)), replace=False).tolist())

    return DatasetEntry(match.group(0), lambda root, dl: _imagenet_subset(match.group(0), root, pick),
                        IMAGENET_LAYOUT, downloadable=False)


@register_pattern(r"ImageNetClasses:(\d+)")
def imagenet_first_classes(match: re.Match) -> DatasetEntry:
    """The first N ImageNet classes with at most 100 training images each."""
    count = int(match.group(1))

    def pick(targets: list[int]) -> list[int]:
        taken: dict[int, int] = {}
        chosen = []
        for index, label in enumerate(targets):
            if label < count and taken.get(label, 0) < 100:
                taken[label] = taken.get(label, 0) + 1
                chosen.append(index)
        return chosen

    return DatasetEntry(match.group(0), lambda root, dl: _imagenet_subset(match.group(0), root, pick),
                        IMAGENET_LAYOUT, downloadable=False)


FOLDER_LAYOUT = ("PATH/train/<class>/*.jpg, PATH/test/<class>/ (or val/ or validation/), optional "
                 "PATH/classnames.txt (test/ alone for an evaluation-only dataset)")
GENERIC_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "an image of a {}.", "a picture of a {}."]


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def open_image_folder(root: Path, name: str) -> TaskData:
    """``root/train/<class>/...`` and ``root/test|val|validation/<class>/...``.

    Class names come from ``root/classnames.txt`` (one per line, in sorted folder order) when present, else from
    the folder names with underscores turned into spaces. Evaluation uses ``test/``, or ``val/`` when there is
    no test folder. Without ``train/`` the dataset serves evaluation only (e.g. ImageNet-R placed as
    ``root/test/<class>/``): its classes are the evaluation folder's and it has no train split.
    """
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist: expected {FOLDER_LAYOUT}")
    train_dir = root / "train"
    eval_dir = _first_existing(root, ("test", "val", "validation"))
    if eval_dir is None:
        lacks = "test|val|validation/" if train_dir.is_dir() else "train/ and test|val|validation/"
        raise UserError(f"image folder {root} lacks {lacks}: expected {FOLDER_LAYOUT}")
    val_dir = _first_existing(root, ("val", "validation"))
    if train_dir.is_dir():
        _refuse_empty_class_folders(train_dir)
        with reading_split("train"):
            train = TolerantImageFolder(str(train_dir), is_valid_file=_is_image)
        classes, classes_from = train.classes, train_dir
        openers = {"train": lambda: train, "test": lambda: _eval_folder(eval_dir, classes, train_dir)}
    else:  # evaluation only: the evaluation folder defines the classes
        _refuse_empty_class_folders(eval_dir)
        with reading_split("test"):
            evaluation = TolerantImageFolder(str(eval_dir), is_valid_file=_is_image)
        classes, classes_from = evaluation.classes, eval_dir
        openers = {"test": lambda: evaluation}
    names_file = root / "classnames.txt"
    if names_file.is_file():
        classnames = class_names_for_folders(names_file, classes, classes_from)
    else:
        classnames = readable_list(classes)
    if val_dir is not None:
        openers["val"] = lambda: _eval_folder(val_dir, classes, classes_from)
    return TaskData(name, classnames, GENERIC_TEMPLATES, openers)


def _normal(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def class_names_for_folders(names_file: Path, classes: list[str], classes_from: Path) -> list[str]:
    """The readable name of each class folder (in ``classes``' order) from a class-names file, matched by name
    wherever the file says which folder a name belongs to, so that no label is ever silently swapped:

    - ``folder: name`` (or ``folder<TAB>name``) lines: by folder, in any order;
    - plain names that are the folder names (ignoring case and ``_``/space): by name, in any order;
    - other plain names: one per folder, in sorted folder order, refused when a name that is a folder's name
      stands in another folder's place.
    """
    try:
        text = names_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{names_file} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    folders = set(classes)
    pairs = [re.split(r"\t|:\s*", line, maxsplit=1) for line in lines]
    if lines and all(len(p) == 2 and p[0].strip() in folders for p in pairs):
        mapping = {p[0].strip(): p[1].strip() for p in pairs}
        missing = [c for c in classes if c not in mapping]
        if missing or len(mapping) != len(pairs):
            problem = f"misses {', '.join(missing[:5])}" if missing else "repeats a folder"
            raise UserError(f"{names_file} maps folders to names but {problem} (class folders of {classes_from})")
        return [mapping[c] for c in classes]
    if len(lines) != len(classes):
        raise UserError(f"{names_file} lists {len(lines)} names but {classes_from} has {len(classes)} class "
                        f"folders: one name per folder, in sorted folder order, or 'folder: name' lines")
    by_folder = {_normal(c): c for c in classes}
    named = [by_folder.get(_normal(line)) for line in lines]
    if all(named) and len(set(named)) == len(classes):
        order = {folder: line for folder, line in zip(named, lines)}
        return [order[c] for c in classes]
    misplaced = [line for line, folder, c in zip(lines, named, classes) if folder is not None and folder != c]
    if misplaced:
        raise UserError(f"{names_file} names class folders out of their sorted order ({', '.join(misplaced[:3])}): "
                        f"labels would be swapped; list every folder's name in sorted folder order, or write "
                        f"'folder: name' lines")
    return lines


def _eval_folder(folder: Path, classes: list[str], classes_from: Path) -> ImageFolder:
    _refuse_empty_class_folders(folder)
    data = TolerantImageFolder(str(folder), is_valid_file=_is_image)
    if data.classes != classes:
        missing = sorted(set(classes) - set(data.classes))
        extra = sorted(set(data.classes) - set(classes))
        parts = ([f"lacks class folder(s) {', '.join(missing[:5])}"] if missing else []) + \
                ([f"has class folder(s) {', '.join(extra[:5])} that {classes_from.name}/ lacks"] if extra else [])
        raise UserError(f"{folder} {' and '.join(parts)}: its labels must be {classes_from.name}/'s (an image of "
                        f"each class, or remove the class from both)")
    return data


def _refuse_empty_class_folders(folder: Path) -> None:
    """torchvision's message for a class folder without images names no folder; this one does."""
    if not folder.is_dir():
        return
    empty = sorted(d.name for d in folder.iterdir()
                   if d.is_dir() and not any(_is_image(str(f)) for f in d.rglob("*") if f.is_file()))
    if empty:
        raise UserError(f"class folder(s) {', '.join(empty[:5])} in {folder} hold no image "
                        f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder")


@register_pattern(r"ImageFolder:(.+)")
def image_folder(match: re.Match) -> DatasetEntry:
    path = Path(match.group(1))
    return DatasetEntry(match.group(0), lambda root, dl: open_image_folder(path, match.group(0)),
                        FOLDER_LAYOUT, downloadable=False, root=path)
