"""What a complete copy of every dataset looks like and where it comes from: facts only.

Nothing here reads a file or imports torch, so that ``python -m mtil.data`` answers a bad name or ``--help`` at
once. The counts are those of the public datasets as torchvision reads them with mtil's splits (see
``mtil/datasets/torchvision_sets.py``): a dataset without an official split is counted whole (mtil splits it 80/20
with seed 42). ``tests/test_data_cli.py`` checks that every name of mtil's dataset registry has an entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# How a dataset gets under --data-location (what `prepare` does with it).
TORCHVISION = "torchvision"  # the dataset class's own download=True fetches and extracts it
IMAGENET = "imagenet"  # torchvision.datasets.ImageNet lays out the three archives the user downloaded
CARS = "cars"  # extracted from the four Stanford Cars files the user downloaded
CAPTIONS = "captions"  # the official validation TSV converted into the file mtil reads
GENERATED = "generated"  # rendered in memory: always present


@dataclass(frozen=True)
class Archive:
    """A file torchvision downloads, at the place it expects it (relative to ``--data-location``)."""

    path: str
    checked: bool = True  # torchvision verifies its md5 before reusing a copy it finds there


@dataclass(frozen=True)
class DatasetFacts:
    name: str
    kind: str
    folder: str | None = None  # the folder under --data-location that holds all of it
    classes: int | None = None
    images: dict[str, int] = field(default_factory=dict)  # split -> images; "all" for a seeded 80/20 split
    page: str = ""  # the official page
    layout: str = ""  # what it looks like under --data-location once in place
    archives: tuple[Archive, ...] = ()  # TORCHVISION: what its download fetches
    sources: tuple[str, ...] = ()  # IMAGENET, CARS, CAPTIONS: the files the user downloads (in DATA/ or DATA/folder/)
    size: str = ""  # the download, roughly
    note: str = ""

    @property
    def seeded(self) -> bool:
        return "all" in self.images

    @property
    def downloadable(self) -> bool:
        return self.kind == TORCHVISION


def _tv(name: str, folder: str, classes: int, images: dict[str, int], page: str, layout: str,
        archives: tuple[Archive, ...], size: str, note: str = "") -> DatasetFacts:
    return DatasetFacts(name, TORCHVISION, folder, classes, images, page, layout, archives, (), size, note)


_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
_MNIST_FILES = tuple(Archive(f"MNIST/raw/{stem}.gz") for stem in (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))

_ENTRIES = [
    _tv("Aircraft", "fgvc-aircraft-2013b", 100, {"train": 3334, "test": 3333}, f"{_VGG}/fgvc-aircraft/",
        "fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_train.txt, images_variant_test.txt}",
        (Archive("fgvc-aircraft-2013b.tar.gz", checked=False),), "2.8 GB"),
    _tv("Caltech101", "caltech101", 101, {"all": 8677}, "https://data.caltech.edu/records/mzrjq-6wc02",
        "caltech101/101_ObjectCategories/<category>/image_*.jpg (BACKGROUND_Google is left out)",
        (Archive("caltech101/caltech-101.zip"),), "140 MB"),
    _tv("CIFAR10", "cifar-10-batches-py", 10, {"train": 50000, "test": 10000},
        "https://www.cs.toronto.edu/~kriz/cifar.html", "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
        (Archive("cifar-10-python.tar.gz"),), "170 MB", "not one of the eleven MTIL datasets"),
    _tv("CIFAR100", "cifar-100-python", 100, {"train": 50000, "test": 10000},
        "https://www.cs.toronto.edu/~kriz/cifar.html", "cifar-100-python/{train, test, meta}",
        (Archive("cifar-100-python.tar.gz"),), "170 MB"),
    _tv("DTD", "dtd", 47, {"train": 1880, "test": 1880}, f"{_VGG}/dtd/",
        "dtd/dtd/{images/<texture>/*.jpg, labels/train1.txt, labels/test1.txt}",
        (Archive("dtd/dtd-r1.0.1.tar.gz"),), "600 MB"),
    _tv("EuroSAT", "eurosat", 10, {"all": 27000}, "https://github.com/phelber/EuroSAT",
        "eurosat/2750/<Class>/*.jpg", (Archive("eurosat/EuroSAT.zip"),), "90 MB",
        "the RGB version, from a Hugging Face mirror (torchgeo/eurosat)"),
    _tv("Flowers", "flowers-102", 102, {"train": 1020, "test": 6149}, f"{_VGG}/flowers/102/",
        "flowers-102/{jpg/image_*.jpg, imagelabels.mat, setid.mat}",
        (Archive("flowers-102/102flowers.tgz"), Archive("flowers-102/imagelabels.mat"),
         Archive("flowers-102/setid.mat")), "330 MB"),
    _tv("Food", "food-101", 101, {"train": 75750, "test": 25250},
        "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        "food-101/{images/<dish>/*.jpg, meta/train.json, meta/test.json}", (Archive("food-101.tar.gz"),), "5 GB"),
    _tv("MNIST", "MNIST", 10, {"train": 60000, "test": 10000}, "https://yann.lecun.com/exdb/mnist/",
        "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", _MNIST_FILES, "12 MB",
        "torchvision tries its mirrors in turn"),
    _tv("OxfordPet", "oxford-iiit-pet", 37, {"train": 3680, "test": 3669}, f"{_VGG}/pets/",
        "oxford-iiit-pet/{images/*.jpg, annotations/trainval.txt, annotations/test.txt}",
        (Archive("oxford-iiit-pet/images.tar.gz"), Archive("oxford-iiit-pet/annotations.tar.gz")), "800 MB"),
    DatasetFacts(
        "StanfordCars", CARS, "stanford_cars", 196, {"train": 8144, "test": 8041},
        "https://github.com/pytorch/vision/issues/7545",
        "stanford_cars/{cars_train/*.jpg, cars_test/*.jpg, devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
        "cars_test_annos_withlabels.mat}",
        sources=("car_devkit.tgz", "cars_train.tgz", "cars_test.tgz", "cars_test_annos_withlabels.mat"),
        size="1.9 GB",
        note="torchvision's download is broken upstream and the original Stanford page is gone; the torchvision "
             "issue lists mirrors of the original files"),
    _tv("SUN397", "SUN397", 397, {"all": 108754}, "https://vision.princeton.edu/projects/2010/SUN/",
        "SUN397/{ClassName.txt, <letter>/<scene>/sun_*.jpg}", (Archive("SUN397.tar.gz"),), "37 GB",
        "its server is often slow or down"),
    DatasetFacts(
        "ImageNet", IMAGENET, "ImageNet", 1000, {"train": 1281167, "test": 50000},
        "https://image-net.org/download.php",
        "ImageNet/train/<wnid>/*.JPEG and ImageNet/val/<wnid>/*.JPEG (or ImageNet/val_in_folder/)",
        sources=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"),
        size="150 GB",
        note="ZSCL's default reference images (--ref-dataset ImageNet); needs a free account on image-net.org"),
    DatasetFacts(
        "ConceptualCaptions", CAPTIONS, "conceptual_captions", None, {"captions": 15840},
        "https://ai.google.com/research/ConceptualCaptions/download",
        "conceptual_captions/Validation_GCC-1.1.0-Validation_output.csv (tab-separated, columns title and "
        "filepath)",
        sources=("Validation_GCC-1.1.0-Validation.tsv",), size="3 MB",
        note="ZSCL's default reference sentences (--ref-sentences conceptual_captions); only the captions are "
             "read, so dead image links do not matter"),
]

# The built-in benchmark (mtil.datasets.toyworld): rendered in memory, nothing to get.
TOY_NAMES = ("ToyShape", "ToyColor", "ToyPattern", "ToySize", "ToyCount", "ToyPosition", "ToyBackground",
             "ToyColorA", "ToyColorB", "ToyCaptions")
_ENTRIES += [DatasetFacts(name, GENERATED, note="generated in memory") for name in TOY_NAMES]

CATALOG: dict[str, DatasetFacts] = {entry.name: entry for entry in _ENTRIES}

MTIL_ELEVEN = ("Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
               "StanfordCars", "SUN397")
# Names `prepare` also accepts: the MTIL sequences stand for their eleven datasets; --ref-sentences' spelling.
GROUPS: dict[str, tuple[str, ...]] = {"MTIL": MTIL_ELEVEN, "MTIL-I": MTIL_ELEVEN, "MTIL-II": MTIL_ELEVEN}
ALIASES = {"conceptual_captions": "ConceptualCaptions"}

# The file mtil reads Conceptual Captions from (as mtil.datasets.sentences.CC_FILE, which imports pandas).
CC_OUTPUT = "Validation_GCC-1.1.0-Validation_output.csv"
STAGING = ".mtil-prepare"  # under --data-location: where `prepare` works before anything reaches its place


def expected_images(facts: DatasetFacts) -> str:
    """``train 3,334, test 3,333`` / ``8,677 (80/20 seeded split)`` / ``15,840 captions``."""
    if facts.seeded:
        return f"{facts.images['all']:,} (seeded 80/20 split)"
    if "captions" in facts.images:
        return f"{facts.images['captions']:,} captions"
    return ", ".join(f"{split} {count:,}" for split, count in facts.images.items())
