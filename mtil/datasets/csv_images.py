"""``CSV:PATH``: a dataset listed in a CSV file of image paths and labels (e.g. a generic image set for the IMO
adapter, such as a subset of Open Images).

The file has a header row with the columns ``path`` and ``label`` (others are ignored), and optionally ``split``:

* ``path``: an image file; a relative path is resolved against the folder holding the CSV;
* ``label``: any text; the classes are the distinct labels sorted as strings, and a label's class index is its
  position in that order (``cat``, ``dog`` -> 0, 1; note ``10`` sorts before ``2``). Class names are the labels,
  with ``_`` read as a space;
* ``split`` (optional): ``train``, ``val`` or ``test`` per row. Without the column the rows are split 80/20 into
  train and test by the seeded random split mtil uses for every dataset without an official one (seed 42), so no
  image is ever both trained on and tested on.

A list in Open Images' own columns, ``ImageID`` and ``DisplayName`` (what the IMO seed's ``--images_path`` file
holds), is read too: each row's image is ``<data location>/<ImageID>.jpg`` (``--data-location``, the seed's
``--oi_root``) and its label the ``DisplayName``.

Every row is checked when the dataset is opened: a missing column, an empty path or label, an unknown split or an
image file that does not exist is a one-line error naming the CSV line. Damaged images met later are skipped with a
warning (see :mod:`mtil.datasets.tolerant`).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from mtil.datasets.base import TaskData, readable_list, seeded_split
from mtil.datasets.folders import GENERIC_TEMPLATES
from mtil.datasets.registry import DatasetEntry, register_pattern
from mtil.datasets.tolerant import TolerantDataset
from mtil.errors import UserError

CSV_LAYOUT = ("a CSV file with a header row and the columns path,label (optional split: train/val/test); relative "
              "paths are resolved against the CSV's folder")
SPLIT_VALUES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


class CsvImages(Dataset):
    """(PIL RGB image, class index) for each row; strict: a damaged image raises (the opener wraps it)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]):
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB"), label


OPEN_IMAGES_COLUMNS = ("ImageID", "DisplayName")


def read_csv_rows(csv_path: Path, image_root: Path | None = None) -> list[tuple[str, str, str | None, int]]:
    """(resolved image path, label, split or None, CSV line) per data row, every row checked (see the module
    docstring); one-line UserErrors name the file and the line. ``image_root``: where an Open Images list's
    ``<ImageID>.jpg`` files are (default: the CSV's folder)."""
    if not csv_path.is_file():
        raise UserError(f"CSV file {csv_path} not found: expected {CSV_LAYOUT}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            open_images = all(c in columns for c in OPEN_IMAGES_COLUMNS) and "path" not in columns
            lacking = [c for c in ("path", "label") if c not in columns] if not open_images else []
            if lacking:
                found = ", ".join(repr(c) for c in columns) or "none (empty file)"
                raise UserError(f"{csv_path} has no {' or '.join(repr(c) for c in lacking)} column (columns: "
                                f"{found}): expected {CSV_LAYOUT}")
            has_split = "split" in columns
            rows = []
            root = image_root if image_root is not None else csv_path.parent
            for row in reader:
                if open_images:  # Open Images' columns: <root>/<ImageID>.jpg, labelled by DisplayName
                    image_id = (row.get("ImageID") or "").strip()
                    row = {**row, "path": str(root / f"{image_id}.jpg") if image_id else "",
                           "label": row.get("DisplayName")}
                rows.append(_checked_row(csv_path, reader.line_num, row, has_split))
    except UnicodeDecodeError as exc:
        raise UserError(f"{csv_path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except csv.Error as exc:
        raise UserError(f"{csv_path} is not a readable CSV ({exc})") from None
    if not rows:
        raise UserError(f"{csv_path} lists no images (a header row and no data rows): expected {CSV_LAYOUT}")
    return rows


def _checked_row(csv_path: Path, line: int, row: dict, has_split: bool) -> tuple[str, str, str | None, int]:
    where = f"{csv_path} line {line}"
    path = (row.get("path") or "").strip()
    label = (row.get("label") or "").strip()
    if not path:
        raise UserError(f"{where}: empty path (every row needs path and label)")
    if not label:
        raise UserError(f"{where}: image {path} has an empty label")
    split = None
    if has_split:
        text = (row.get("split") or "").strip().lower()
        split = _SPLIT_ALIASES.get(text)
        if split is None:
            raise UserError(f"{where}: split {text!r} is not one of {', '.join(SPLIT_VALUES)}")
    resolved = Path(path) if Path(path).is_absolute() else csv_path.parent / path
    if not resolved.is_file():
        raise UserError(f"{where}: image {path} not found (looked for {resolved})")
    return str(resolved), label, split, line


def open_csv_dataset(csv_path: Path, name: str, image_root: Path | None = None) -> TaskData:
    """The :class:`TaskData` of a CSV file (see the module docstring)."""
    rows = read_csv_rows(csv_path, image_root)
    labels = sorted({label for _, label, _, _ in rows})
    index = {label: i for i, label in enumerate(labels)}
    where = str(csv_path)
    if rows[0][2] is None:  # no split column: the seeded 80/20 split
        everything = CsvImages([(p, index[label]) for p, label, _, _ in rows], labels)
        halves = seeded_split(everything)
        parts = {split: TolerantDataset(halves[split], where) for split in ("train", "test")}
    else:
        parts = {}
        for split in SPLIT_VALUES:
            chosen = [(p, index[label]) for p, label, s, _ in rows if s == split]
            if chosen:
                parts[split] = TolerantDataset(CsvImages(chosen, labels), where)
        if "test" not in parts:
            raise UserError(f"{csv_path} has no row with split 'test': mark some rows test (every dataset has a "
                            f"test split), or drop the split column for the seeded 80/20 split")
    return TaskData(name, readable_list(labels), GENERIC_TEMPLATES,
                    {split: (lambda data=data: data) for split, data in parts.items()})


@register_pattern(r"CSV:(.+)")
def csv_dataset(match: re.Match) -> DatasetEntry:
    path = Path(match.group(1))
    return DatasetEntry(match.group(0), lambda root, download: open_csv_dataset(path, match.group(0), Path(root)),
                        CSV_LAYOUT, downloadable=False, root=path.parent)

