"""Empty and truncated files in the torchvision sets: every annotation, label or data file of every set, emptied
or cut in half, is a one-line error naming the set before anything is written (or goes unnoticed where the set
does not need the file); a damaged image further in than the first is skipped with a warning mid-run, replaced by
a readable image of the same split."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from mtil.datasets import registry
from mtil.datasets.registry import check_readable
from mtil.datasets.tolerant import TolerantDataset
from mtil.errors import UserError
from tests.fixtures import dataset_formats as fx
from tests.test_datasets_registry import SPECS, TORCHVISION_SETS

IMAGES = {".jpg", ".jpeg", ".png"}
# Files of the layouts that mtil's openers never read: other annotation levels and partitions, Caltech101's
# object outlines, Food-101's and MNIST's second copies (.txt beside the .json read; the .gz archives beside the
# extracted files), the unlabelled Stanford Cars test annotations.
UNREAD = {
    "Aircraft": ["*/families.txt", "*/manufacturers.txt", "*/images_box.txt", "*/images_family_*",
                 "*/images_manufacturer_*", "*/images_t*.txt", "*/images_val.txt", "*/images_variant_trainval.txt",
                 "*/images_variant_val.txt"],
    "Caltech101": ["*/Annotations/*"],
    "DTD": ["*/val1.txt"],
    "Food": ["*/meta/*.txt"],
    "MNIST": ["*.gz"],
    "OxfordPet": ["*/list.txt"],
    "StanfordCars": ["*/cars_test_annos.mat"],
}
# Image lists, one line per image: cut in half, a list still reads as a shorter list (the cut line's image, if
# its name was cut, is then skipped with a warning when met). Emptied, they are refused.
LINE_LISTS = {"Aircraft": ["*/images_variant_t*.txt"], "DTD": ["*/labels/t*1.txt"],
              "OxfordPet": ["*/annotations/t*.txt"]}


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def _data_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGES)


def _outcome(name: str, root: Path) -> str:
    """'ok', or the one-line UserError message; any other exception fails the test (a traceback for a user)."""
    registry._OPEN.clear()
    try:
        with fx.skip_md5_checks():  # as a user's genuine files would pass it, so the damaged file is read
            check_readable(name, root)
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message and name in message, message
        return message
    return "ok"


@pytest.mark.parametrize("name", sorted(TORCHVISION_SETS))
def test_every_data_file_emptied_or_truncated_is_one_line(name, tmp_path):
    spec = SPECS[name]
    spec.make(tmp_path, spec.classes, spec.per_class)
    assert _outcome(name, tmp_path) == "ok"
    files = _data_files(tmp_path)
    unnoticed = []
    for path in files:
        original = path.read_bytes()
        for damage, content in (("zero-byte", b""), ("truncated", original[: len(original) // 2])):
            path.write_bytes(content)
            relative = str(path.relative_to(tmp_path))
            expected_ok = _matches(relative, UNREAD.get(name, [])) or (
                damage == "truncated" and _matches(relative, LINE_LISTS.get(name, [])))
            if (_outcome(name, tmp_path) == "ok") != expected_ok:
                unnoticed.append(f"{relative} {damage}")
        path.write_bytes(original)
    assert not unnoticed, f"{name}: not as expected (refused when unread, or read past): {unnoticed}"


@pytest.mark.parametrize("name", ["Food", "DTD", "SUN397"])
def test_a_damaged_image_mid_run_is_skipped_with_a_warning(name, tmp_path, capsys):
    spec = SPECS[name]
    spec.make(tmp_path, spec.classes, spec.per_class)
    registry._OPEN.clear()
    data = check_readable(name, tmp_path)
    train = data.raw("train")
    assert isinstance(train, TolerantDataset)
    second = fx_file(train, 1)
    Path(second).write_bytes(Path(second).read_bytes()[:60])  # a JPEG header without its pixels
    items = [train[i] for i in range(len(train))]
    assert len(items) == len(train)
    err = capsys.readouterr().err
    assert f"skipped unreadable image {second}" in err and "1 skipped" in err
    assert items[1][1] == items[2 % len(train)][1]  # the next readable item of the same split stands in
    train[1]
    assert "skipped unreadable" not in capsys.readouterr().err  # named once per process


def fx_file(dataset, index: int) -> str:
    from mtil.datasets.tolerant import file_of

    path = file_of(dataset, index)
    assert path is not None
    return path


def test_a_split_with_no_readable_image_is_one_line(tmp_path):
    spec = SPECS["Food"]
    spec.make(tmp_path, spec.classes, spec.per_class)
    registry._OPEN.clear()
    train = check_readable("Food", tmp_path).raw("train")
    for i in range(len(train)):
        Path(fx_file(train, i)).write_bytes(b"")
    with pytest.raises(UserError, match="no image under Food train split could be read"):
        train[0]
