"""Tests for mtil.datasets.classnames and mtil.templates."""

from __future__ import annotations

import string
from collections import Counter

import pytest

from mtil.datasets import classnames as C
from mtil.templates import TEMPLATES, get_templates

EXPECTED_TEMPLATE_COUNTS: dict[str, int] = {
    "Aircraft": 2,
    "Caltech101": 34,
    "CIFAR10": 18,
    "CIFAR100": 18,
    "DTD": 8,
    "EuroSAT": 3,
    "Flowers": 1,
    "Food": 1,
    "MNIST": 1,
    "OxfordPet": 1,
    "StanfordCars": 8,  # CLIP's prompts.md lists 8 car templates
    "SUN397": 2,
    "ImageNet": 80,
}

NAME_LISTS: dict[str, tuple[list[str], int]] = {
    "imagenet": (C.IMAGENET_CLASSNAMES, 1000),
    "flowers102": (C.FLOWERS102_CLASSNAMES, 102),
    "caltech101": (list(C.CALTECH101_READABLE.values()), 101),
    "eurosat": (list(C.EUROSAT_READABLE.values()), 10),
    "cifar10": (C.CIFAR10_CLASSNAMES, 10),
    "cifar100": (C.CIFAR100_CLASSNAMES, 100),
    "dtd": (C.DTD_CLASSNAMES, 47),
    "mnist": (C.MNIST_CLASSNAMES, 10),
}


@pytest.mark.parametrize("name", sorted(NAME_LISTS))
def test_classname_counts(name: str) -> None:
    names, expected = NAME_LISTS[name]
    assert len(names) == expected
    assert all(isinstance(n, str) and n == n.strip() and n for n in names)


@pytest.mark.parametrize("name", sorted(NAME_LISTS))
def test_classnames_unique(name: str) -> None:
    names, _ = NAME_LISTS[name]
    dupes = {n for n, k in Counter(names).items() if k > 1}
    if name == "imagenet":
        # OpenAI's published list repeats these two (indices 657/744, 836/837).
        assert dupes == {"missile", "sunglasses"}
        assert C.IMAGENET_CLASSNAMES.index("missile") == 657
        assert C.IMAGENET_CLASSNAMES.index("sunglasses") == 836
    else:
        assert not dupes


def test_imagenet_anchor_indices() -> None:
    names = C.IMAGENET_CLASSNAMES
    assert names[0] == "tench"
    assert names[151] == "Chihuahua"
    assert names[281] == "tabby cat"
    assert names[400] == "academic gown"
    assert names[517] == "construction crane"
    assert names[999] == "toilet paper"


def test_caltech101_keys_match_torchvision_folders() -> None:
    keys = list(C.CALTECH101_READABLE)
    assert len(keys) == 101 and "BACKGROUND_Google" not in keys
    assert keys == sorted(keys)  # torchvision sorts os.listdir()
    assert C.CALTECH101_READABLE["Faces"] == "off-center face"
    assert C.CALTECH101_READABLE["Faces_easy"] == "centered face"
    assert C.CALTECH101_READABLE["Leopards"] == "leopard"
    assert C.CALTECH101_READABLE["Motorbikes"] == "motorbike"
    assert C.CALTECH101_READABLE["airplanes"] == "airplane"
    assert C.CALTECH101_READABLE["yin_yang"] == "yin and yang symbol"


def test_eurosat_keys() -> None:
    keys = list(C.EUROSAT_READABLE)
    assert keys == sorted(keys)
    assert C.EUROSAT_READABLE["HerbaceousVegetation"] == "brushland or shrubland"
    assert C.EUROSAT_READABLE["SeaLake"] == "lake or sea"


def test_flowers_and_dtd_order() -> None:
    assert C.FLOWERS102_CLASSNAMES[0] == "pink primrose"
    assert C.FLOWERS102_CLASSNAMES[-1] == "blackberry lily"
    assert C.DTD_CLASSNAMES == sorted(C.DTD_CLASSNAMES)
    assert C.DTD_CLASSNAMES[:2] == ["banded", "blotchy"]
    assert C.MNIST_CLASSNAMES == [str(i) for i in range(10)]


def test_cifar100_matches_torchvision_style_ids() -> None:
    assert C.CIFAR100_CLASSNAMES == sorted(C.CIFAR100_CLASSNAMES)
    for n in ("aquarium fish", "maple tree", "lawn mower", "sweet pepper"):
        assert n in C.CIFAR100_CLASSNAMES
    assert all("_" not in n for n in C.CIFAR100_CLASSNAMES)


def test_readable_helpers() -> None:
    assert C.readable("aquarium_fish") == "aquarium fish"
    assert C.readable("  maple_tree ") == "maple tree"
    assert C.readable("polka-dotted") == "polka-dotted"
    assert C.readable("Egyptian_Mau") == "Egyptian Mau"
    assert C.food101_readable("apple_pie") == "apple pie"
    assert C.food101_readable("macaroni_and_cheese") == "macaroni and cheese"
    assert C.sun397_readable("abbey") == "abbey"
    assert C.sun397_readable("apartment_building/outdoor") == "apartment building outdoor"
    assert C.sun397_readable("/a/apartment_building/outdoor") == "apartment building outdoor"
    assert C.sun397_readable("theater/indoor_procenium") == "theater indoor procenium"
    assert C.oxfordpet_readable("Abyssinian") == "abyssinian"
    assert C.oxfordpet_readable("American Bulldog") == "american bulldog"
    assert C.oxfordpet_readable("american_pit_bull_terrier") == "american pit bull terrier"


def test_readable_maps_torchvision_cifar100_ids() -> None:
    raw = ["aquarium_fish", "lawn_mower", "maple_tree", "willow_tree"]
    assert [C.readable(r) for r in raw] == ["aquarium fish", "lawn mower", "maple tree", "willow tree"]


def test_template_counts() -> None:
    assert set(TEMPLATES) == set(EXPECTED_TEMPLATE_COUNTS)
    for name, count in EXPECTED_TEMPLATE_COUNTS.items():
        assert len(TEMPLATES[name]) == count, name


@pytest.mark.parametrize("name", sorted(EXPECTED_TEMPLATE_COUNTS))
def test_templates_have_one_placeholder(name: str) -> None:
    fmt = string.Formatter()
    for t in TEMPLATES[name]:
        fields = [f for _, f, _, _ in fmt.parse(t) if f is not None]
        assert fields == [""], t
        assert t.format("X").count("X") == 1
    assert len(set(TEMPLATES[name])) == len(TEMPLATES[name])


def test_template_examples() -> None:
    assert TEMPLATES["Aircraft"][0] == "a photo of a {}, a type of aircraft."
    assert TEMPLATES["EuroSAT"][0] == "a centered satellite photo of {}."
    assert TEMPLATES["Flowers"] == ["a photo of a {}, a type of flower."]
    assert TEMPLATES["MNIST"][0].format("7") == 'a photo of the number: "7".'


def test_get_templates() -> None:
    assert get_templates("CIFAR10") == TEMPLATES["CIFAR10"]
    got = get_templates("DTD")
    got.append("mutated {}")
    assert len(TEMPLATES["DTD"]) == 8
    with pytest.raises(KeyError):
        get_templates("NoSuchDataset")
