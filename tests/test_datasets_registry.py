"""Every registered dataset opens from a tiny on-disk fixture through ``open_dataset``, with readable class names
that line up with torchvision's labels; missing data and unknown names are one-line ``UserError``s.

The fixtures come from ``tests/fixtures/dataset_formats.py``. Where mtil looks class ids up by name (Caltech101,
EuroSAT) or maps a fixed name list by index (CIFAR, DTD, Flowers, MNIST, ImageNet), the fixture is made with the
real class ids / the full number of classes, renaming the generator's placeholder folders where it has no option
for real names (Caltech101, DTD, CIFAR100).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from mtil.datasets.tolerant import TolerantDataset
from mtil.datasets import classnames as C
from mtil.datasets import registry, toyworld
from mtil.datasets.folders import FOLDER_LAYOUT, IMAGENET_LAYOUT
from mtil.datasets.registry import open_dataset
from mtil.datasets.sentences import CC_FILE, conceptual_captions
from mtil.errors import UserError
from mtil.models.transforms import eval_transform
from tests.fixtures import dataset_formats as fx

# --------------------------------------------------------------------------- #
# fixtures with real class ids
# --------------------------------------------------------------------------- #
# Three real Caltech101 folders (sorted as torchvision sorts them) and their names in CLIP's list.
CALTECH_REAL = {"Faces": "off-center face", "Leopards": "leopard", "car_side": "side of a car"}


def make_caltech101_real(root: Path, num_classes: int, per_class: int) -> list[str]:
    """``make_caltech101`` writes placeholder folders (object_000 ...): rename them to real categories."""
    placeholders = fx.make_caltech101(root, num_classes, per_class)
    real = sorted(CALTECH_REAL)[:num_classes]
    base = Path(root) / "caltech101"
    for old, new in zip(placeholders, real):  # label order is kept: both lists are sorted
        for top in ("101_ObjectCategories", "Annotations"):
            (base / top / old).rename(base / top / new)
    return real


def make_dtd_real(root: Path, num_classes: int, per_class: int) -> list[str]:
    """``make_dtd`` writes texture000 ...: rename to the real DTD folders (CLIP's names are the folder names)."""
    placeholders = fx.make_dtd(root, num_classes, per_class)
    real = C.DTD_CLASSNAMES[:num_classes]
    data = Path(root) / "dtd" / "dtd"
    for old, new in zip(placeholders, real):
        (data / "images" / old).rename(data / "images" / new)
    for labels in (data / "labels").glob("*.txt"):
        lines = labels.read_text().splitlines()
        fixed = []
        for line in lines:
            folder, file = line.split("/")
            fixed.append(f"{real[placeholders.index(folder)]}/{file}")
        labels.write_text("".join(f"{line}\n" for line in fixed))
    return real


def make_cifar100_real(root: Path, num_classes: int, per_class: int) -> list[str]:
    """``make_cifar100`` names classes fine_000 ...: write the real (underscored) ids into ``meta``."""
    fx.make_cifar100(root, num_classes, per_class)
    meta_path = Path(root) / "cifar-100-python" / "meta"
    with open(meta_path, "rb") as handle:
        meta = pickle.load(handle)
    real = [name.replace(" ", "_") for name in C.CIFAR100_CLASSNAMES[:num_classes]]
    meta["fine_label_names"] = real
    with open(meta_path, "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return real


def _words(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("/", " ").split())


@dataclass(frozen=True)
class Spec:
    make: Callable[[Path, int, int], list[str]]
    classes: int  # classes written (the full count where mtil maps a fixed list by index)
    per_class: int = 2
    expected: Callable[[list[str]], list[str]] | None = None  # readable names from the fixture's class ids
    seeded_split: bool = False
    pixels: bool = True  # colours far enough apart to recover labels from pixels


SPECS: dict[str, Spec] = {
    "Aircraft": Spec(fx.make_fgvc_aircraft, 3, expected=lambda ids: ids),
    "Caltech101": Spec(make_caltech101_real, 3, per_class=5, expected=lambda ids: [CALTECH_REAL[i] for i in ids],
                       seeded_split=True),
    "CIFAR10": Spec(fx.make_cifar10, 10, per_class=1, expected=lambda ids: ids),
    "CIFAR100": Spec(make_cifar100_real, 100, per_class=1, expected=lambda ids: [_words(i) for i in ids]),
    "DTD": Spec(make_dtd_real, 47, per_class=1, expected=lambda ids: ids),
    "EuroSAT": Spec(fx.make_eurosat, 10, per_class=3, expected=lambda ids: [C.EUROSAT_READABLE[i] for i in ids],
                    seeded_split=True),
    "Flowers": Spec(fx.make_flowers102, 102, per_class=1),
    "Food": Spec(fx.make_food101, 3, expected=lambda ids: [_words(i) for i in ids]),
    "MNIST": Spec(fx.make_mnist, 10, per_class=1, expected=lambda ids: ids),
    "OxfordPet": Spec(fx.make_oxford_pet, 3, expected=lambda ids: [_words(i).lower() for i in ids]),
    "StanfordCars": Spec(fx.make_stanford_cars, 3, expected=lambda ids: ids),
    "SUN397": Spec(fx.make_sun397, 3, per_class=5, expected=lambda ids: [_words(i) for i in ids],
                   seeded_split=True),
    "ImageNet": Spec(fx.make_imagenet_folders, 3, expected=lambda ids: ids),  # a partial copy keeps folder names
}

TORCHVISION_SETS = {"Aircraft", "Caltech101", "CIFAR10", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST",
                    "OxfordPet", "StanfordCars", "SUN397"}


def _open(name: str, root: Path):
    with fx.skip_md5_checks():  # CIFAR and Flowers check md5 sums a fixture cannot match
        return open_dataset(name, root)


def _base(dataset):
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def _check_task(task, num_classes: int, *, pixels: bool, full_test: bool) -> None:
    """Class names, labels, images and transformed tensors of an opened task."""
    assert len(task.classnames) == num_classes
    assert all(isinstance(n, str) and n.strip() == n and n for n in task.classnames)
    assert task.templates and all("{}" in t for t in task.templates)
    test = task.raw("test")
    targets = task.targets("test")
    assert len(targets) == len(test) > 0
    assert all(0 <= t < num_classes for t in targets)
    items = [test[i] for i in range(len(test))]
    assert [int(label) for _, label in items] == targets
    if full_test:
        assert set(targets) == set(range(num_classes))
    for image, label in items:
        assert isinstance(image, Image.Image)
        if pixels:
            assert fx.nearest_class(image, num_classes) == label
    transformed = task.dataset("test", eval_transform(32))
    assert len(transformed) == len(test)
    for i in range(len(transformed)):
        tensor, label = transformed[i]
        assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
        assert label == targets[i]
    assert all(0 <= t < num_classes for t in task.targets("train"))


def test_every_torchvision_set_has_a_fixture_here():
    registry.find_entry("CIFAR10")  # fills the registry
    registered = {name for name, entry in registry.REGISTRY.items()
                  if entry.open.__module__ == "mtil.datasets.torchvision_sets"}
    assert registered == TORCHVISION_SETS
    assert TORCHVISION_SETS | {"ImageNet"} == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_opens_from_fixture(tmp_path, name):
    spec = SPECS[name]
    ids = spec.make(tmp_path, spec.classes, spec.per_class)
    task = _open(name, tmp_path)
    assert task.name == name
    _check_task(task, spec.classes, pixels=spec.pixels, full_test=not spec.seeded_split)
    if spec.expected is not None:
        assert task.classnames == spec.expected(ids)
    # Opened once per process: the same object comes back (no rescan of folders).
    assert _open(name, tmp_path) is task


def test_imagenet_with_1000_classes_uses_clip_names(tmp_path):
    fx.make_imagenet_folders(tmp_path, 1000, 1, size=4)
    task = open_dataset("ImageNet", tmp_path)
    assert task.classnames == C.IMAGENET_CLASSNAMES
    targets = task.targets("test")
    assert sorted(targets) == list(range(1000))
    assert len(task.templates) == 80


@pytest.mark.parametrize("name", sorted(n for n, s in SPECS.items() if s.seeded_split))
def test_seeded_split_is_disjoint_and_reproducible(tmp_path, name):
    spec = SPECS[name]
    spec.make(tmp_path, spec.classes, spec.per_class)
    total = spec.classes * spec.per_class
    first = _open(name, tmp_path)
    assert isinstance(first.raw("train"), TolerantDataset)  # damaged images are skipped within the split
    train, test = first.raw("train").dataset, first.raw("test").dataset
    assert isinstance(train, Subset) and isinstance(test, Subset)
    assert _base(train) is _base(test) and len(_base(train)) == total
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted([*train.indices, *test.indices]) == list(range(total))
    assert len(train) == round(0.8 * total)
    assert sorted(train.indices) != list(range(len(train)))  # shuffled, not the first 80%
    for image, label in (train[i] for i in range(len(train))):
        assert fx.nearest_class(image, spec.classes) == label

    registry._OPEN.clear()
    again = _open(name, tmp_path)
    assert again is not first
    assert list(again.raw("train").dataset.indices) == list(train.indices)
    assert list(again.raw("test").dataset.indices) == list(test.indices)


# --------------------------------------------------------------------------- #
# ImageNet subsets and image folders
# --------------------------------------------------------------------------- #
def test_imagenet_subset(tmp_path):
    wnids = fx.make_imagenet_folders(tmp_path, 3, 4)
    full = open_dataset("ImageNet", tmp_path)
    subset = open_dataset("ImageNetSubset:5", tmp_path)
    train = subset.raw("train")
    assert len(train) == 5 and len(set(train.indices)) == 5
    assert set(train.indices) <= set(range(len(full.raw("train"))))
    assert subset.classnames == full.classnames == wnids
    assert subset.targets("test") == full.targets("test")
    assert subset.targets("train") == [full.targets("train")[i] for i in train.indices]
    registry._OPEN.clear()
    assert open_dataset("ImageNetSubset:5", tmp_path).raw("train").indices == train.indices  # seeded
    assert len(open_dataset("ImageNetSubset:100", tmp_path).raw("train")) == 12  # at most what exists


def test_imagenet_first_classes(tmp_path):
    fx.make_imagenet_folders(tmp_path, 3, 4)
    task = open_dataset("ImageNetClasses:2", tmp_path)
    targets = task.targets("train")
    assert sorted(set(targets)) == [0, 1]
    assert len(targets) == 2 * 4
    for image, label in (task.raw("train")[i] for i in range(len(targets))):
        assert fx.nearest_class(image, 3) == label
    assert len(task.classnames) == 3


def test_image_folder(tmp_path):
    root = tmp_path / "my set"
    names = fx.make_image_folder(root, 3, 2)
    task = open_dataset(f"ImageFolder:{root}", tmp_path / "unused")
    assert task.classnames == [_words(n) for n in names]
    _check_task(task, 3, pixels=True, full_test=True)
    test_files = {Path(p).parent.parent.name for p, _ in task.raw("test").samples}
    assert test_files == {"test"}  # test/ wins over val/
    assert set(task.openers) == {"train", "test", "val"}


def test_image_folder_with_classnames_file_and_validation_dir(tmp_path):
    root = tmp_path / "set"
    fx.make_image_folder(root, 3, 2, val_dir="validation", splits=("train", "val"))
    (root / "classnames.txt").write_text("red thing\n\ngreen thing\nblue thing\n")
    task = open_dataset(f"ImageFolder:{root}", tmp_path)
    assert task.classnames == ["red thing", "green thing", "blue thing"]
    assert {Path(p).parent.parent.name for p, _ in task.raw("test").samples} == {"validation"}
    _check_task(task, 3, pixels=True, full_test=True)


def test_image_folder_bad_layouts(tmp_path):
    root = tmp_path / "set"
    fx.make_image_folder(root, 3, 1)
    (root / "classnames.txt").write_text("only one\n")
    with pytest.raises(UserError, match="classnames.txt"):
        open_dataset(f"ImageFolder:{root}", tmp_path)
    (root / "classnames.txt").unlink()
    (root / "test" / "class_002").rename(root / "test" / "other")
    with pytest.raises(UserError, match=r"lacks class folder\(s\) class_002 and has class folder\(s\) other"):
        open_dataset(f"ImageFolder:{root}", tmp_path)


# --------------------------------------------------------------------------- #
# missing data, unknown names, the built-in benchmark
# --------------------------------------------------------------------------- #
MISSING_NAMES = sorted(TORCHVISION_SETS) + ["ImageNet", "ImageNetSubset:5", "ImageNetClasses:2"]


@pytest.mark.parametrize("name", MISSING_NAMES)
@pytest.mark.parametrize("exists", [True, False], ids=["empty-dir", "no-dir"])
def test_missing_data_is_a_user_error(tmp_path, name, exists):
    location = tmp_path / "data"
    if exists:
        location.mkdir()
    entry = registry.find_entry(name)
    with pytest.raises(UserError) as info:
        open_dataset(name, location)
    message = str(info.value)
    assert name in message and str(location) in message
    assert entry.layout in message
    assert ("--download" in message) == entry.downloadable
    assert "\n" not in message
    if name.startswith("ImageNet"):
        assert IMAGENET_LAYOUT in message
    assert not registry._OPEN  # a failure is not cached


def test_stanford_cars_missing_does_not_advise_download(tmp_path):
    with pytest.raises(UserError) as info:
        open_dataset("StanfordCars", tmp_path)
    assert "--download" not in str(info.value)


def test_missing_image_folder(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        open_dataset(f"ImageFolder:{path}", tmp_path)
    assert str(path) in str(info.value) and FOLDER_LAYOUT in str(info.value)
    path.mkdir()
    (path / "train").mkdir()
    with pytest.raises(UserError, match="test"):
        open_dataset(f"ImageFolder:{path}", tmp_path)


@pytest.mark.parametrize("name", ["Caltech101", "EuroSAT"])
def test_unknown_class_folder_gets_a_readable_folder_name(tmp_path, name):
    if name == "Caltech101":
        fx.make_caltech101(tmp_path, 2, 2)  # placeholder folder names, not Caltech101 categories
    else:
        fx.make_eurosat(tmp_path, 2, 2)
        extra = tmp_path / "eurosat" / "2750" / "NotAClass"
        extra.mkdir()
        Image.new("RGB", (8, 8)).save(extra / "x.jpg")
    data = open_dataset(name, tmp_path)  # an unexpected folder is a class named after the folder, no crash
    if name == "EuroSAT":
        assert "NotAClass" in data.classnames and "annual crop land" in data.classnames
    else:
        assert all(" " in c or c.isalpha() for c in data.classnames) and "_" not in "".join(data.classnames)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as info:
        open_dataset("NoSuchSet", "data")
    message = str(info.value)
    assert "NoSuchSet" in message
    for name in registry.dataset_names():
        assert name in message
    assert {"ImageNetSubset:N", "ImageNetClasses:N", "ImageFolder:PATH"} <= set(message.replace(",", " ").split())
    assert set(registry.dataset_names()) >= TORCHVISION_SETS | {"ImageNet"} | set(toyworld.TASKS)
    with pytest.raises(UserError, match="did you mean CIFAR10"):
        open_dataset("cifar10", "data")


@pytest.mark.parametrize("name", sorted(toyworld.TASKS))
def test_builtin_toy_tasks_need_no_files(tmp_path, name):
    location = tmp_path / "no-data-here"
    task = open_dataset(name, location)
    assert not location.exists()
    info = toyworld.TASKS[name]
    assert task.classnames == info.classes
    assert task.templates == info.templates
    targets = task.targets("test")
    assert len(targets) == len(task.raw("test")) > 0
    assert set(targets) == set(range(len(info.classes)))
    for i in (0, 1, len(targets) - 1):
        image, label = task.raw("test")[i]
        assert isinstance(image, Image.Image) and image.size == (32, 32)
        assert label == targets[i]
    tensor, _ = task.dataset("test", eval_transform(32))[0]
    assert tensor.shape == (3, 32, 32)


# --------------------------------------------------------------------------- #
# Conceptual Captions
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("subfolder", ["", "conceptual_captions"])
def test_conceptual_captions(tmp_path, subfolder):
    captions = fx.make_conceptual_captions(tmp_path / subfolder if subfolder else tmp_path, n=12)
    assert conceptual_captions(tmp_path) == captions
    assert conceptual_captions(str(tmp_path)) == captions


def test_conceptual_captions_missing_and_broken(tmp_path):
    with pytest.raises(UserError) as info:
        conceptual_captions(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "conceptual_captions" / CC_FILE) in message
    assert str(tmp_path / CC_FILE) in message
    (tmp_path / CC_FILE).write_text("caption\tpath\nhello\tx.jpg\n")
    with pytest.raises(UserError, match="title"):
        conceptual_captions(tmp_path)
    (tmp_path / CC_FILE).write_text("title\tfilepath\n  \tx.jpg\n")
    with pytest.raises(UserError, match="no captions"):
        conceptual_captions(tmp_path)
