"""The eleven MTIL datasets and CIFAR10, read through torchvision with the literature's splits and class names.

Each dataset's root is ``--data-location``; torchvision's own folder names sit below it (see ``layout``).
Nothing is downloaded unless ``--download`` is given. Most openers build the train split at once (for its class
list) inside ``reading_split("train")``, so a damaged train file is reported as such.
"""
from __future__ import annotations

from pathlib import Path

from torchvision import datasets as tv

from mtil.datasets import classnames as names
from mtil.datasets.base import TaskData, reading_split, seeded_split
from mtil.datasets.registry import register
from mtil.datasets.tolerant import TolerantDataset
from mtil.templates import get_templates


def _task(name: str, classnames: list[str], openers: dict) -> TaskData:
    """The task, each split's images read through ``TolerantDataset``: a damaged image met mid-run is skipped
    with a warning instead of ending the run (``check_readable`` still decodes the first one strictly)."""
    tolerant = {split: (lambda open_split=open_split, split=split:
                        TolerantDataset(open_split(), f"{name} {split} split"))
                for split, open_split in openers.items()}
    return TaskData(name, list(classnames), get_templates(name), tolerant)


@register("Aircraft", "fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_train.txt, "
                      "images_variant_test.txt}")
def aircraft(root: Path, download: bool) -> TaskData:
    with reading_split("train"):
        train = tv.FGVCAircraft(root, split="train", annotation_level="variant", download=download)
    return _task("Aircraft", train.classes, {
        "train": lambda: train,
        "test": lambda: tv.FGVCAircraft(root, split="test", annotation_level="variant", download=download),
    })


@register("Caltech101", "caltech101/101_ObjectCategories/<category>/image_*.jpg (seeded 80/20 split)")
def caltech101(root: Path, download: bool) -> TaskData:
    full = tv.Caltech101(root, target_type="category", download=download)
    splits = seeded_split(full)
    return _task("Caltech101", [names.CALTECH101_READABLE.get(c, names.readable(c)) for c in full.categories],
                 {s: (lambda d=d: d) for s, d in splits.items()})


def _cifar(name: str, cls, layout_root: Path, download: bool) -> TaskData:
    with reading_split("train"):
        train = cls(layout_root, train=True, download=download)
    return _task(name, [names.readable(c) for c in train.classes], {"train": lambda: train,
                                    "test": lambda: cls(layout_root, train=False, download=download)})


@register("CIFAR10", "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}")
def cifar10(root: Path, download: bool) -> TaskData:
    return _cifar("CIFAR10", tv.CIFAR10, root, download)


@register("CIFAR100", "cifar-100-python/{train, test, meta}")
def cifar100(root: Path, download: bool) -> TaskData:
    return _cifar("CIFAR100", tv.CIFAR100, root, download)


@register("DTD", "dtd/dtd/{images/<texture>/*.jpg, labels/train1.txt, labels/test1.txt}")
def dtd(root: Path, download: bool) -> TaskData:
    with reading_split("train"):
        train = tv.DTD(root, split="train", partition=1, download=download)
    return _task("DTD", [names.readable(c) for c in train.classes], {
        "train": lambda: train,
        "test": lambda: tv.DTD(root, split="test", partition=1, download=download),
    })


@register("EuroSAT", "eurosat/2750/<Class>/*.jpg (seeded 80/20 split)")
def eurosat(root: Path, download: bool) -> TaskData:
    full = tv.EuroSAT(root, download=download)
    splits = seeded_split(full)
    return _task("EuroSAT", [names.EUROSAT_READABLE.get(c, names.readable(c)) for c in full.classes],
                 {s: (lambda d=d: d) for s, d in splits.items()})


@register("Flowers", "flowers-102/{jpg/image_*.jpg, imagelabels.mat, setid.mat}")
def flowers(root: Path, download: bool) -> TaskData:
    with reading_split("train"):
        train = tv.Flowers102(root, split="train", download=download)
    return _task("Flowers", names.FLOWERS102_CLASSNAMES, {
        "train": lambda: train,
        "test": lambda: tv.Flowers102(root, split="test", download=download),
    })


@register("Food", "food-101/{images/<dish>/*.jpg, meta/train.json, meta/test.json}")
def food(root: Path, download: bool) -> TaskData:
    with reading_split("train"):
        train = tv.Food101(root, split="train", download=download)
    return _task("Food", [names.food101_readable(c) for c in train.classes], {
        "train": lambda: train,
        "test": lambda: tv.Food101(root, split="test", download=download),
    })


@register("MNIST", "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte")
def mnist(root: Path, download: bool) -> TaskData:
    with reading_split("train"):
        train = tv.MNIST(root, train=True, download=download)
    return _task("MNIST", names.MNIST_CLASSNAMES, {
        "train": lambda: train,
        "test": lambda: tv.MNIST(root, train=False, download=download),
    })


@register("OxfordPet", "oxford-iiit-pet/{images/*.jpg, annotations/trainval.txt, annotations/test.txt}")
def oxford_pet(root: Path, download: bool) -> TaskData:
    with reading_split("train"):
        train = tv.OxfordIIITPet(root, split="trainval", download=download)
    return _task("OxfordPet", [names.oxfordpet_readable(c) for c in train.classes], {
        "train": lambda: train,
        "test": lambda: tv.OxfordIIITPet(root, split="test", download=download),
    })


@register("StanfordCars", "stanford_cars/{cars_train/, cars_test/, devkit/cars_meta.mat, "
                          "devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat} (torchvision's "
                          "download is broken upstream: get the files from a mirror and place them so)",
          downloadable=False)
def stanford_cars(root: Path, download: bool) -> TaskData:
    with reading_split("train"):
        train = tv.StanfordCars(root, split="train", download=download)
    return _task("StanfordCars", list(train.classes), {
        "train": lambda: train,
        "test": lambda: tv.StanfordCars(root, split="test", download=download),
    })


@register("SUN397", "SUN397/{ClassName.txt, <letter>/<scene>/*.jpg} (seeded 80/20 split)")
def sun397(root: Path, download: bool) -> TaskData:
    full = tv.SUN397(root, download=download)
    splits = seeded_split(full)
    return _task("SUN397", [names.sun397_readable(c) for c in full.classes],
                 {s: (lambda d=d: d) for s, d in splits.items()})
