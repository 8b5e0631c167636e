"""Tests for the built-in ToyWorld benchmark (mtil.datasets.toyworld)."""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from mtil.datasets import toyworld as tw
from mtil.datasets.toyworld import (
    ATTRIBUTES,
    BUILTIN_ORDER,
    NEVER_CAPTIONED,
    TASKS,
    ToyCaptionDataset,
    ToyTaskDataset,
    caption_for,
    render_scene,
    sample_scene,
)

BASE_SCENE = {
    "shape": "square",
    "color": "white",
    "pattern": "solid",
    "size": "large",
    "count": "one",
    "position": "center",
    "background": "dark",
}


def _render(seed: int = 0, pixels: int = 32, **changes: str) -> np.ndarray:
    return render_scene({**BASE_SCENE, **changes}, np.random.default_rng(seed), pixels, noise_std=0.0)


def _foreground(seed: int = 0, pixels: int = 32, **changes: str) -> np.ndarray:
    """Boolean object mask: pixels that differ from the scene's own background."""
    scene = {**BASE_SCENE, **changes}
    bg = tw._background(scene["background"], np.random.default_rng(seed), pixels)
    img = _render(seed, pixels, **changes).astype(np.float32)
    return np.abs(img - bg).max(-1) > 40


# --------------------------------------------------------------------------- #
# API / metadata
# --------------------------------------------------------------------------- #


def test_tasks_metadata():
    assert set(BUILTIN_ORDER) <= set(TASKS)
    for name, info in TASKS.items():
        assert name.startswith("Toy")
        assert info.attribute in ATTRIBUTES
        assert set(info.classes) <= set(ATTRIBUTES[info.attribute])
        assert 3 <= len(info.templates) <= 5
        for t in info.templates:
            assert t.count("{}") == 1
            t.format("x")
    for attr, values in ATTRIBUTES.items():
        assert 3 <= len(values) <= 8 and len(set(values)) == len(values), attr
    all_words = [w for values in ATTRIBUTES.values() for w in values]
    assert len(all_words) == len(set(all_words)), "attribute words must be unambiguous"


def test_sample_scene_uniform():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(2000)]
    for attr, values in ATTRIBUTES.items():
        counts = Counter(s[attr] for s in scenes)
        assert set(counts) == set(values)
        assert min(counts.values()) > 0.6 * 2000 / len(values), (attr, counts)


# --------------------------------------------------------------------------- #
# Task datasets
# --------------------------------------------------------------------------- #


def _bytes(ds, n: int) -> list[bytes]:
    return [ds[i][0].tobytes() for i in range(n)]


def test_task_determinism_and_seeds():
    a = ToyTaskDataset("ToyShape", size=20, seed=3)
    b = ToyTaskDataset("ToyShape", size=20, seed=3)
    c = ToyTaskDataset("ToyShape", size=20, seed=4)
    assert _bytes(a, 20) == _bytes(b, 20)
    assert all(x != y for x, y in zip(_bytes(a, 20), _bytes(c, 20)))
    # random access order does not matter
    assert a[7][0].tobytes() == b[7][0].tobytes()


def test_train_test_and_tasks_differ():
    train = ToyTaskDataset("ToyColor", "train", size=20)
    test = ToyTaskDataset("ToyColor", "test", size=20)
    other = ToyTaskDataset("ToyPattern", "train", size=20)
    assert all(x != y for x, y in zip(_bytes(train, 20), _bytes(test, 20)))
    assert all(x != y for x, y in zip(_bytes(train, 20), _bytes(other, 20)))
    assert len(ToyTaskDataset("ToyColor")) == 2000 and len(ToyTaskDataset("ToyColor", "test")) == 1000


@pytest.mark.parametrize("task", list(TASKS))
def test_labels_balanced_and_consistent(task):
    ds = ToyTaskDataset(task, size=103)
    k = len(ds.classes)
    counts = Counter(ds.targets)
    assert set(counts) == set(range(k))
    assert max(counts.values()) - min(counts.values()) <= 1
    for i in range(0, 103, 9):
        img, label = ds[i]
        assert isinstance(img, Image.Image) and img.mode == "RGB"
        assert label == ds.targets[i]
        assert ds.scene(i)[ds.attribute] == ds.classes[label]
    assert ds.templates == TASKS[task].templates


def test_image_size_and_transform():
    ds = ToyTaskDataset("ToyCount", size=4, image_size=48, transform=lambda im: np.asarray(im))
    x, _ = ds[0]
    assert x.shape == (48, 48, 3) and x.dtype == np.uint8
    assert ToyCaptionDataset(size=2, image_size=24)[1][0].size == (24, 24)
    assert render_scene(BASE_SCENE, np.random.default_rng(0), 40).shape == (40, 40, 3)


def test_bad_arguments():
    with pytest.raises(KeyError):
        ToyTaskDataset("ToyNothing")
    with pytest.raises(ValueError):
        ToyTaskDataset("ToyShape", split="val")
    with pytest.raises(IndexError):
        ToyTaskDataset("ToyShape", size=3)[3]


def test_domain_signatures_skew_other_attributes():
    shape = [ToyTaskDataset("ToyShape", size=400).scene(i) for i in range(400)]
    color = [ToyTaskDataset("ToyColor", size=400).scene(i) for i in range(400)]
    assert Counter(s["background"] for s in shape).most_common(1)[0][0] == "dark"
    assert Counter(s["background"] for s in color).most_common(1)[0][0] == "light"
    # the label attribute itself is never skewed
    bg = ToyTaskDataset("ToyBackground", size=400).targets
    assert len(set(Counter(bg).values())) == 1


# --------------------------------------------------------------------------- #
# Visual separability of every attribute
# --------------------------------------------------------------------------- #


def test_colors_differ():
    means = {}
    for c in ATTRIBUTES["color"]:
        mask = _foreground(color=c)
        means[c] = _render(color=c)[mask].mean(0)
    for a, b in combinations(means, 2):
        assert np.abs(means[a] - means[b]).max() > 40, (a, b, means[a], means[b])


def test_shapes_differ():
    # drawn at 64 px: a large object is only ~9 px wide at the benchmark's 32 px, where shape is the hardest task
    masks = {s: _foreground(pixels=64, shape=s) for s in ATTRIBUTES["shape"]}
    for a, b in combinations(masks, 2):
        inter = (masks[a] & masks[b]).sum()
        union = (masks[a] | masks[b]).sum()
        assert inter / union < 0.85, (a, b, inter / union)


def test_sizes_increase():
    for seed in range(5):
        areas = [_foreground(seed, size=s).sum() for s in ATTRIBUTES["size"]]
        assert areas[0] < areas[1] < areas[2], areas


def test_counts_increase():
    from scipy import ndimage

    for seed in range(5):
        for word, n in zip(ATTRIBUTES["count"], [1, 2, 3, 4]):
            mask = _foreground(seed, count=word, size="small", shape="circle")
            assert ndimage.label(mask)[1] == n, (seed, word)


def test_positions_move_centroid():
    for seed in range(5):
        cent = {}
        for p in ATTRIBUTES["position"]:
            ys, xs = np.nonzero(_foreground(seed, position=p, size="medium"))
            cent[p] = (xs.mean(), ys.mean())
        assert cent["left"][0] + 6 < cent["center"][0] < cent["right"][0] - 6
        assert cent["top"][1] + 6 < cent["center"][1] < cent["bottom"][1] - 6


def test_patterns_differ():
    from scipy import ndimage

    def dark_fraction(p: str, seed: int) -> float:
        mask = ndimage.binary_erosion(_foreground(seed, pattern=p))  # drop anti-aliased rim
        lum = _render(seed, pattern=p)[mask].mean(-1)
        return float((lum < 0.75 * lum.max()).mean())

    for seed in range(3):
        fr = {p: dark_fraction(p, seed) for p in ATTRIBUTES["pattern"]}
        assert fr["solid"] < 0.1 < min(fr["striped"], fr["dotted"], fr["checkered"]), fr
    mask = _foreground()  # same geometry for every pattern (patterns draw after geometry)
    imgs = {p: _render(pattern=p)[mask].astype(int) for p in ATTRIBUTES["pattern"]}
    for a, b in combinations(imgs, 2):
        assert np.abs(imgs[a] - imgs[b]).mean() > 10, (a, b)


def test_backgrounds_differ():
    def border_mean(bg: str) -> np.ndarray:
        img = _render(background=bg).astype(float)
        return np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).mean(0)

    means = {b: border_mean(b) for b in ATTRIBUTES["background"]}
    for a, b in combinations(means, 2):
        assert np.abs(means[a] - means[b]).max() > 30, (a, b)


# --------------------------------------------------------------------------- #
# Captions
# --------------------------------------------------------------------------- #

_WORD_TO_ATTR = {w: a for a, values in ATTRIBUTES.items() for w in values}
_WORD_TO_ATTR.update({tw._plural(w): "shape" for w in ATTRIBUTES["shape"]})


def _mentions(caption: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for tok in re.findall(r"[a-z]+", caption.lower()):
        if tok in _WORD_TO_ATTR:
            attr = _WORD_TO_ATTR[tok]
            singular = tok if tok in ATTRIBUTES[attr] else next(w for w in ATTRIBUTES[attr] if tw._plural(w) == tok)
            found.setdefault(attr, set()).add(singular)
    return found


def test_captions_name_scene_attributes():
    rng = np.random.default_rng(0)
    seen = Counter()
    for _ in range(500):
        scene = sample_scene(rng)
        cap = caption_for(scene, rng)
        found = _mentions(cap)
        assert 2 <= len(found) <= 5, cap
        for attr, words in found.items():
            assert words == {scene[attr]}, (cap, scene)
            assert scene[attr] not in NEVER_CAPTIONED.get(attr, ()), cap
            seen[attr] += 1
    assert set(seen) == set(ATTRIBUTES) - {"position"}  # no caption says where an object is
    assert seen["color"] > 100  # ToyColorA's colours are named, ToyColorB's never


def test_caption_dataset():
    a = ToyCaptionDataset("train", size=30, seed=1)
    b = ToyCaptionDataset("train", size=30, seed=1)
    test = ToyCaptionDataset("test", size=30, seed=1)
    assert a.captions == b.captions == [a.caption(i) for i in range(30)]
    assert _bytes(a, 10) == _bytes(b, 10)
    assert all(x != y for x, y in zip(_bytes(a, 10), _bytes(test, 10)))
    for i in range(30):
        img, cap = a[i]
        assert isinstance(img, Image.Image) and cap == a.captions[i]
        assert all(words == {a.scene(i)[attr]} for attr, words in _mentions(cap).items())
    assert len(set(a.captions)) > 20  # varied sentences
    assert len(ToyCaptionDataset()) == 20000 and len(ToyCaptionDataset("test")) == 1000
