"""The tiny fixture datasets load with the real torchvision 0.29 classes (download=False)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torchvision.datasets as tvd
from PIL import Image

from tests.fixtures import dataset_formats as fx

C, P = 3, 2  # classes, images per class per split


def check(ds: Any, length: int, num_classes: int = C) -> None:
    """Length, label coverage, PIL output and pixel colour matching the label."""
    assert len(ds) == length
    labels = []
    for i in range(len(ds)):
        img, label = ds[i]
        assert isinstance(img, Image.Image)
        assert fx.nearest_class(img, num_classes) == label
        labels.append(label)
    assert set(labels) == set(range(num_classes))


def test_mnist(tmp_path: Path) -> None:
    assert fx.make_mnist(tmp_path, C, P) == ["0", "1", "2"]
    for train in (True, False):
        ds = tvd.MNIST(tmp_path, train=train, download=False)
        check(ds, C * P)
        assert ds[0][0].size == (16, 16)
    tvd.MNIST(tmp_path, download=True)  # raw files present -> no network


@pytest.mark.parametrize(
    ("maker", "cls"), [(fx.make_cifar10, tvd.CIFAR10), (fx.make_cifar100, tvd.CIFAR100)]
)
def test_cifar(tmp_path: Path, maker: Any, cls: Any) -> None:
    names = maker(tmp_path, C, P)
    with pytest.raises(RuntimeError):
        cls(tmp_path, download=False)  # hard-coded md5s cannot match
    with fx.skip_md5_checks():
        for train in (True, False):
            ds = cls(tmp_path, train=train, download=False)
            check(ds, C * P)
            assert ds.classes == names
            assert ds[0][0].size == (32, 32)


def test_dtd(tmp_path: Path) -> None:
    names = fx.make_dtd(tmp_path, C, P)
    for split in ("train", "val", "test"):
        ds = tvd.DTD(tmp_path, split=split, download=False)
        check(ds, C * P)
        assert ds.classes == names


def test_flowers102(tmp_path: Path) -> None:
    assert fx.make_flowers102(tmp_path, C, P) == ["1", "2", "3"]
    with pytest.raises(RuntimeError):
        tvd.Flowers102(tmp_path, download=False)
    with fx.skip_md5_checks():
        for split in ("train", "val", "test"):
            check(tvd.Flowers102(tmp_path, split=split, download=False), C * P)


def test_food101(tmp_path: Path) -> None:
    names = fx.make_food101(tmp_path, C, P)
    for split in ("train", "test"):
        ds = tvd.Food101(tmp_path, split=split, download=False)
        check(ds, C * P)
        assert ds.classes == names


def test_oxford_pet(tmp_path: Path) -> None:
    names = fx.make_oxford_pet(tmp_path, C, P)
    for split in ("trainval", "test"):
        ds = tvd.OxfordIIITPet(tmp_path, split=split, download=False)
        check(ds, C * P)
        assert ds.classes == [n.replace("_", " ").title() for n in names]
    seg = tvd.OxfordIIITPet(tmp_path, target_types=["category", "segmentation"])
    assert isinstance(seg[0][1][1], Image.Image)


def test_fgvc_aircraft(tmp_path: Path) -> None:
    names = fx.make_fgvc_aircraft(tmp_path, C, P)
    for split, n in (("train", P), ("val", P), ("trainval", 2 * P), ("test", P)):
        ds = tvd.FGVCAircraft(tmp_path, split=split, download=False)
        check(ds, C * n)
        assert ds.classes == names
    for level in ("family", "manufacturer"):
        check(tvd.FGVCAircraft(tmp_path, split="test", annotation_level=level), C * P)


def test_stanford_cars(tmp_path: Path) -> None:
    names = fx.make_stanford_cars(tmp_path, C, P)
    for split in ("train", "test"):
        ds = tvd.StanfordCars(tmp_path, split=split, download=False)
        check(ds, C * P)
        assert ds.classes == names


def test_sun397(tmp_path: Path) -> None:
    names = fx.make_sun397(tmp_path, C, P)
    ds = tvd.SUN397(tmp_path, download=False)
    check(ds, C * P)
    assert ds.classes == names
    assert names[2].endswith("/indoor")


def test_caltech101(tmp_path: Path) -> None:
    names = fx.make_caltech101(tmp_path, C, P)
    ds = tvd.Caltech101(tmp_path, target_type="category", download=False)
    check(ds, C * P)  # BACKGROUND_Google is dropped by torchvision
    assert ds.categories == names
    _, (label, contour) = tvd.Caltech101(tmp_path, target_type=["category", "annotation"])[0]
    assert contour.shape[0] == 2


def test_eurosat(tmp_path: Path) -> None:
    names = fx.make_eurosat(tmp_path, C, P)
    ds = tvd.EuroSAT(tmp_path, download=False)
    check(ds, C * P)
    assert ds.classes == names


def test_imagenet_folders(tmp_path: Path) -> None:
    wnids = fx.make_imagenet_folders(tmp_path, C, P)
    for split in ("train", "val"):
        folder = tvd.ImageFolder(tmp_path / "ImageNet" / split)
        check(folder, C * P)
        assert folder.classes == wnids
        ds = tvd.ImageNet(tmp_path / "ImageNet", split=split)
        check(ds, C * P)
        assert ds.wnids == wnids


def test_conceptual_captions(tmp_path: Path) -> None:
    captions = fx.make_conceptual_captions(tmp_path, n=20)
    csv = tmp_path / "Validation_GCC-1.1.0-Validation_output.csv"
    df = pd.read_csv(csv, sep="\t")
    assert list(df.columns) == ["title", "filepath"]
    assert df["title"].tolist() == captions
    for rel in df["filepath"]:
        with Image.open(csv.parent / rel) as img:
            assert img.size == (16, 16)


@pytest.mark.parametrize("val_dir", ["val", "validation"])
def test_image_folder(tmp_path: Path, val_dir: str) -> None:
    names = fx.make_image_folder(tmp_path, C, P, val_dir=val_dir)
    suffixes = {p.suffix for p in tmp_path.rglob("*.*")}
    assert {".jpg", ".png"} <= suffixes
    for split in ("train", val_dir, "test"):
        ds = tvd.ImageFolder(tmp_path / split)
        check(ds, C * P)
        assert ds.classes == names


def test_more_classes(tmp_path: Path) -> None:
    """Colours stay separable with more classes."""
    fx.make_dtd(tmp_path, num_classes=10, per_class=1, size=8)
    check(tvd.DTD(tmp_path, split="test"), 10, num_classes=10)
