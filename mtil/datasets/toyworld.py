"""ToyWorld: the built-in, download-free benchmark.

Procedurally rendered small RGB images of simple objects whose attributes are
plain English words (shape, color, pattern, size, count, position,
background).  It provides

* ``ToyCaptionDataset`` -- (image, caption) pairs covering *all* attribute
  combinations, for contrastive pre-training of a tiny CLIP and as ZSCL
  reference data;
* ``ToyTaskDataset`` -- one classification task per attribute (``ToyShape``,
  ``ToyColor``, ...), plus two on halves of the colours (``ToyColorA``,
  ``ToyColorB``), used as the continual-learning sequence.

Scene model.  An image shows ``count`` identical objects (same shape, color,
pattern, size) arranged in a small group (pair / triangle / 2x2 block with a
random rotation) whose centre lies in the ``position`` region, on a textured
``background``.  Realism: per-image color and brightness jitter, size jitter,
small rotation jitter, random placement inside the region, a random shading
gradient and Gaussian pixel noise.  Shapes are drawn from signed distance
functions on a coordinate grid (anti-aliased, fully vectorised with numpy).

Domain signatures.  Real continual-learning datasets differ in their image
distribution, so every classification task skews the attributes it does *not*
classify (see ``DOMAIN_SIGNATURES``); its own label is always balanced:

=============  ===========================================================
ToyShape       clean icons: mostly dark background, solid fill, few and not
               small objects, low noise
ToyColor       catalogue shots: mostly light background, solid/striped fill
ToyPattern     fabric swatches: mostly large, single objects, wooden background
ToySize        mostly a single solid, compact object (circle, square, diamond,
               heart), grassy background
ToyCount       objects on a table: mostly small, wooden background, more noise
ToyPosition    outdoor scenes: mostly a single small/medium object, grassy
               background
ToyBackground  uniform (no signature)
ToyColorA      red / green / blue / yellow: mostly dark or grassy background, large
ToyColorB      purple / orange / white / cyan: mostly light or wooden background,
               groups of three or four
=============  ===========================================================

Determinism.  Item ``i`` of a dataset is a pure function of
``(seed, task, split, i)``: its generator is
``np.random.default_rng([seed, crc32(task), split_index, i])``.  The label of
task item ``i`` is ``i % num_classes`` (exact class balance, no rendering
needed for ``targets``).
"""
from __future__ import annotations

import bisect
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

# --------------------------------------------------------------------------- #
# Attributes and tasks
# --------------------------------------------------------------------------- #

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "cross", "star", "ring", "diamond", "heart"],
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"],
    "pattern": ["solid", "striped", "dotted", "checkered"],
    "size": ["small", "medium", "large"],
    "count": ["one", "two", "three", "four"],
    "position": ["left", "right", "top", "bottom", "center"],
    "background": ["dark", "light", "grassy", "wooden"],
}


@dataclass(frozen=True)
class TaskInfo:
    """A classification task: which attribute it labels, its prompts and classes."""

    attribute: str
    templates: list[str]
    classes: list[str]


_TEMPLATES: dict[str, list[str]] = {
    "shape": [
        "a photo of a {}.",
        "a {} shape.",
        "a drawing of a {}.",
        "a picture of a {}.",
        "an image of a {}.",
    ],
    "color": [
        "a photo of something {}.",
        "a photo of a {} object.",
        "a {} shape.",
        "a picture of {} things.",
        "the object is {}.",
    ],
    "pattern": [
        "a photo of a {} object.",
        "a {} shape.",
        "a picture of something {}.",
        "an object with a {} pattern.",
    ],
    "size": [
        "a photo of a {} object.",
        "a {} shape.",
        "a picture of something {}.",
        "the object is {}.",
    ],
    "count": [
        "a photo of {} objects.",
        "there are {} shapes in the picture.",
        "a picture showing {} things.",
        "{} objects.",
    ],
    "position": [
        "a photo of an object at the {}.",
        "a shape located at the {} of the image.",
        "objects near the {}.",
        "a picture with something at the {}.",
    ],
    "background": [
        "a photo of something on a {} background.",
        "a {} background.",
        "an object against a {} background.",
        "a picture with a {} background.",
    ],
}

# Two colour tasks on disjoint halves of the colours (and in different image domains): like two real datasets that
# share a concept, training one moves the other.
_COLOR_HALVES = {"ToyColorA": ["red", "green", "blue", "yellow"], "ToyColorB": ["purple", "orange", "white", "cyan"]}

TASKS: dict[str, TaskInfo] = {
    **{f"Toy{name}": TaskInfo(attr, list(_TEMPLATES[attr]), list(ATTRIBUTES[attr])) for name, attr in [
        ("Shape", "shape"),
        ("Color", "color"),
        ("Pattern", "pattern"),
        ("Size", "size"),
        ("Count", "count"),
        ("Position", "position"),
        ("Background", "background"),
    ]},
    **{name: TaskInfo("color", list(_TEMPLATES["color"]), colors) for name, colors in _COLOR_HALVES.items()},
}

# The default sequence (the named order ``ToyWorld``, mtil/sequences/toyworld.yaml, which also sets the steps per
# task). The pre-trained ``toyclip`` knows background and ToyColorA zero-shot and size in part; position and
# ToyColorB it was never told about (``NEVER_CAPTIONED``) and learns by fine-tuning. Shape stays near chance for so
# small a model at 32 px, and pattern and count are learned little beyond their zero-shot level, so they are extra
# tasks, not part of the order.
BUILTIN_ORDER: list[str] = ["ToyPosition", "ToySize", "ToyColorB", "ToyBackground", "ToyColorA"]

# Per-task skew of the *non-label* attributes (relative weights per value,
# unlisted values get weight 1) and the pixel-noise std.  See module docstring.
DOMAIN_SIGNATURES: dict[str, dict] = {
    "ToyShape": {
        "weights": {"background": {"dark": 5}, "pattern": {"solid": 3},
                    "count": {"one": 3, "two": 2}, "size": {"medium": 2, "large": 2}},
        "noise": 5.0,
    },
    "ToyColor": {
        "weights": {"background": {"light": 5}, "pattern": {"solid": 2, "striped": 2}},
        "noise": 7.0,
    },
    "ToyPattern": {
        "weights": {"size": {"large": 4, "medium": 2}, "count": {"one": 4, "two": 2},
                    "background": {"wooden": 3}},
        "noise": 6.0,
    },
    "ToySize": {
        "weights": {"count": {"one": 8}, "background": {"grassy": 3}, "pattern": {"solid": 3},
                    "shape": {"circle": 4, "square": 4, "diamond": 4, "heart": 4}},
        "noise": 5.0,
    },
    "ToyCount": {
        "weights": {"size": {"small": 4, "medium": 2}, "background": {"wooden": 4}},
        "noise": 9.0,
    },
    "ToyPosition": {
        "weights": {"background": {"grassy": 3}, "size": {"small": 3, "medium": 3}, "count": {"one": 8}},
        "noise": 6.0,
    },
    "ToyBackground": {"weights": {}, "noise": 8.0},
    "ToyColorA": {"weights": {"background": {"dark": 3, "grassy": 2}, "size": {"large": 2}}, "noise": 7.0},
    "ToyColorB": {"weights": {"background": {"light": 3, "wooden": 2}, "count": {"three": 2, "four": 2}},
                  "noise": 8.0},
}

# --------------------------------------------------------------------------- #
# Scene sampling
# --------------------------------------------------------------------------- #


@lru_cache(maxsize=None)
def _cumulative(weights: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]) -> dict[str, list[float]]:
    """Cumulative value probabilities per attribute for hashable ``weights``."""
    out = {}
    for attr, values in ATTRIBUTES.items():
        w = dict(dict(weights).get(attr, ()))
        cum = np.cumsum([float(w.get(v, 1.0)) for v in values])
        out[attr] = (cum / cum[-1]).tolist()
    return out


def _freeze(weights: dict[str, dict[str, float]] | None) -> tuple:
    return tuple(sorted((a, tuple(sorted(w.items()))) for a, w in (weights or {}).items()))


def _sample_scene(
    rng: np.random.Generator,
    weights: dict[str, dict[str, float]] | None = None,
    fixed: dict[str, str] | None = None,
) -> dict[str, str]:
    """Draw a scene; ``weights`` skews attributes (relative weight per value), ``fixed`` pins some."""
    cum = _cumulative(_freeze(weights))
    draws = rng.random(len(ATTRIBUTES)).tolist()
    scene = {}
    for u, (attr, values) in zip(draws, ATTRIBUTES.items()):
        if fixed and attr in fixed:
            scene[attr] = fixed[attr]
        else:
            scene[attr] = values[min(bisect.bisect_right(cum[attr], u), len(values) - 1)]
    return scene


def sample_scene(rng: np.random.Generator) -> dict[str, str]:
    """Draw every attribute value uniformly at random."""
    return _sample_scene(rng)


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #

_COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 75, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 55, 205),
    "orange": (245, 135, 25),
    "white": (240, 240, 240),
    "cyan": (40, 210, 225),
}
_BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "dark": (28, 28, 36),
    "light": (200, 200, 192),
    "grassy": (62, 112, 44),
    "wooden": (128, 86, 50),
}
_SIZE_FRAC = {"small": 0.055, "medium": 0.09, "large": 0.14}  # object radius / image size (jitter keeps them apart)
_COUNT_N = {"one": 1, "two": 2, "three": 3, "four": 4}
_POSITION_XY = {  # group centre, as fractions of the image size (x, y)
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(xx, yy)``, each ``(size, size)`` float32."""
    c = np.arange(size, dtype=np.float32) + np.float32(0.5)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return xx, yy


# Signed distance (approximate, in pixels; < 0 inside) of each shape with
# "radius" r, in object-local coordinates (u right, v down).  All fit in ~1.05 r.
def _sdf_circle(u, v, r):
    return np.hypot(u, v) - 0.92 * r


def _sdf_square(u, v, r):
    return np.maximum(np.abs(u), np.abs(v)) - 0.76 * r


def _sdf_diamond(u, v, r):
    return (np.abs(u) + np.abs(v) - 1.05 * r) * (1 / math.sqrt(2))


def _sdf_ring(u, v, r):
    half = max(0.3 * r, 0.75)
    return np.abs(np.hypot(u, v) - (r - half)) - half


def _sdf_cross(u, v, r):
    w = max(0.3 * r, 0.75)
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - r, av - w), np.maximum(au - w, av - r))


def _sdf_triangle(u, v, r):
    big = 1.2 * r  # circumradius; shifted so the bounding box is centred
    v = v - 0.25 * big
    return np.maximum(v, 0.866 * np.abs(u) - 0.5 * v) - 0.5 * big  # bottom edge / slanted edges


def _sdf_star(u, v, r):
    sector = 2 * math.pi / 5
    t = np.mod(np.arctan2(v, u) + math.pi / 2, sector) * (1 / sector)  # a tip points up
    tip = np.abs(2 * t - 1)  # 1 at tips, 0 between them
    return 0.6 * (np.hypot(u, v) - (0.42 * r + 0.66 * r * tip**1.5))


def _sdf_heart(u, v, r):
    lobes = np.minimum(np.hypot(u - 0.45 * r, v + 0.3 * r), np.hypot(u + 0.45 * r, v + 0.3 * r)) - 0.52 * r
    tri = np.maximum(-0.2 * r - v, 0.79 * np.abs(u) + 0.61 * (v - 0.95 * r))  # tip at (0, 0.95 r)
    return np.minimum(lobes, tri)


_SDF: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "circle": _sdf_circle,
    "square": _sdf_square,
    "triangle": _sdf_triangle,
    "cross": _sdf_cross,
    "star": _sdf_star,
    "ring": _sdf_ring,
    "diamond": _sdf_diamond,
    "heart": _sdf_heart,
}


def _clip01(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray | None:
    """Fraction of the secondary (dark) colour at each pixel, or None for solid."""
    if kind == "solid":
        return None
    if kind == "striped":
        phi = int(rng.integers(4)) * math.pi / 4 + rng.uniform(-0.15, 0.15)
        period = max(3.0, 0.8 * r) * rng.uniform(0.9, 1.1)
        k = 2 * math.pi / period
        w = u * (k * math.cos(phi)) + v * (k * math.sin(phi))
        return _clip01(2.0 * np.sin(w + rng.uniform(0, 2 * math.pi)) + 0.5)
    if kind == "dotted":
        period = max(3.2, 0.85 * r) * rng.uniform(0.9, 1.1)
        ou, ov = rng.uniform(0, period, 2).tolist()
        du = np.mod(u + ou, period) - period / 2
        dv = np.mod(v + ov, period) - period / 2
        return _clip01(max(0.9, 0.3 * period) + 0.5 - np.hypot(du, dv))
    if kind == "checkered":
        cell = max(2.0, 0.55 * r) * rng.uniform(0.9, 1.1)
        ou, ov = rng.uniform(0, 2 * cell, 2).tolist()
        return np.mod(np.floor((u + ou) * (1 / cell)) + np.floor((v + ov) * (1 / cell)), 2.0)
    raise ValueError(f"unknown pattern {kind!r}")


_LAYOUTS = {
    1: np.zeros((1, 2)),
    2: np.array([[-0.5, 0.0], [0.5, 0.0]]),
    3: np.array([[0.0, -1.0], [0.866, 0.5], [-0.866, 0.5]]) / math.sqrt(3),  # triangle, side 1
    4: np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]),
}


def _layout(n: int, r: float, rng: np.random.Generator) -> np.ndarray:
    """Offsets ``(n, 2)`` of ``n`` non-overlapping objects around the group centre."""
    d = r * rng.uniform(2.45, 2.7) + 1.0  # centre spacing (a pixel apart at least); shapes fit in ~1.08 r
    th = rng.uniform(0, math.pi) if n > 1 else 0.0
    c, s = math.cos(th), math.sin(th)
    rot = np.array([[c, s], [-s, c]]) * d
    return _LAYOUTS[n] @ rot + rng.uniform(-0.05 * r, 0.05 * r, (n, 2))


def _background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Background ``(size, size, 3)`` float32 image with texture and a lighting gradient."""
    xx, yy = _grid(size)
    base = np.array(_BACKGROUND_RGB[kind]) * rng.uniform(0.85, 1.15) + rng.normal(0, 5, 3)
    ang = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.0, 0.3) / size
    shade = 1.0 + (xx - size / 2) * (amp * math.cos(ang)) + (yy - size / 2) * (amp * math.sin(ang))
    img = shade[..., None] * base.astype(np.float32)
    if kind == "grassy":
        tex = 0.5 * rng.standard_normal((1, size), dtype=np.float32) + 0.5 * rng.standard_normal(
            (size, size), dtype=np.float32
        )
        img += tex[..., None] * np.array([9.0, 20.0, 7.0], dtype=np.float32)
    elif kind == "wooden":
        period = rng.uniform(3.0, 6.0) * size / 32
        wave = np.sin(xx * (2 * math.pi / (size * rng.uniform(0.4, 1.0))) + rng.uniform(0, 2 * math.pi))
        grain = np.sin((yy + 1.5 * wave) * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi))
        img += grain[..., None] * np.array([18.0, 12.0, 7.0], dtype=np.float32)
    return img


def render_scene(
    scene: dict[str, str],
    rng: np.random.Generator,
    image_size: int = 32,
    noise_std: float | None = None,
) -> np.ndarray:
    """Render ``scene`` to an ``(image_size, image_size, 3)`` uint8 array.

    ``noise_std`` is the Gaussian pixel-noise std (default: drawn in [4, 10]).
    """
    s = image_size
    xx, yy = _grid(s)
    img = _background(scene["background"], rng, s)

    # geometry: group of identical objects, centred in the position region
    r = _SIZE_FRAC[scene["size"]] * s * rng.uniform(0.9, 1.1)
    offsets = _layout(_COUNT_N[scene["count"]], r, rng)
    extent = np.abs(offsets).max(0) + 1.08 * r
    centre = (np.array(_POSITION_XY[scene["position"]]) + rng.uniform(-0.04, 0.04, 2)) * s
    lo, hi = extent + 0.5, s - extent - 0.5
    centre = np.where(lo <= hi, np.minimum(np.maximum(centre, lo), hi), s / 2)
    cx = (centre[0] + offsets[:, 0]).astype(np.float32)[:, None, None]
    cy = (centre[1] + offsets[:, 1]).astype(np.float32)[:, None, None]
    th = rng.uniform(-0.15, 0.15)
    c, sn = math.cos(th), math.sin(th)
    dx, dy = xx - cx, yy - cy  # (n, s, s)
    u = c * dx + sn * dy
    v = c * dy - sn * dx
    alpha = _clip01(0.5 - _SDF[scene["shape"]](u, v, r))  # (n, s, s); objects are disjoint

    # appearance: colour jitter, optional pattern in a darker shade
    color = np.array(_COLOR_RGB[scene["color"]]) * rng.uniform(0.8, 1.1) + rng.normal(0, 12, 3)
    pat = _pattern(scene["pattern"], u, v, r, rng)
    cover = np.minimum(alpha.sum(0), 1.0)
    lit = cover if pat is None else cover - 0.55 * (alpha * pat).sum(0)
    img *= (1.0 - cover)[..., None]
    img += lit[..., None] * color.astype(np.float32)

    noise = rng.uniform(4.0, 10.0) if noise_std is None else noise_std
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
    img += 0.5
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


# --------------------------------------------------------------------------- #
# Captions
# --------------------------------------------------------------------------- #

# What the caption corpus never names, so that the pre-trained ``toyclip`` does not know it zero-shot and the
# benchmark has tasks to learn, as real CLIP knows some datasets' classes and not others: no caption says where an
# object is, nor names the colours of ToyColorB (their images are in the corpus; their words are not).
NEVER_CAPTIONED: dict[str, frozenset[str]] = {
    "position": frozenset(ATTRIBUTES["position"]),
    "color": frozenset(_COLOR_HALVES["ToyColorB"]),
}
_GENERIC_NOUNS = ["object", "shape", "thing"]
_POSITION_PHRASES = {
    "left": ["on the left", "on the left side", "at the left"],
    "right": ["on the right", "on the right side", "at the right"],
    "top": ["at the top", "near the top", "at the top of the image"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom of the image"],
    "center": ["in the center", "at the center", "near the center"],
}
_BACKGROUND_PHRASES = ["on a {} background", "against a {} background", "with a {} background"]
_FRAMES = [
    "{np}{tail}",
    "a photo of {np}{tail}.",
    "a picture of {np}{tail}.",
    "an image showing {np}{tail}.",
    "a drawing of {np}{tail}.",
    "there {be} {np}{tail}.",
]


def _plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x", "ch", "sh")) else word + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[rng.integers(len(options))]


def caption_for(scene: dict[str, str], rng: np.random.Generator) -> str:
    """A natural caption naming 2-5 randomly chosen attributes of ``scene`` verbatim (each attribute equally
    likely), never a value of ``NEVER_CAPTIONED``."""
    names = [a for a in ATTRIBUTES if scene[a] not in NEVER_CAPTIONED.get(a, ())]
    k = int(rng.integers(2, 6))
    said = {names[j] for j in rng.permutation(len(names))[:k].tolist()}
    plural = scene["count"] != "one"

    noun = scene["shape"] if "shape" in said else _pick(rng, _GENERIC_NOUNS)
    noun = _plural(noun) if plural else noun
    adjs = [scene[a] for a in ("size", "color", "pattern") if a in said]
    if "size" in said and scene["size"] == "medium" and rng.random() < 0.3:
        adjs[0] = "medium-sized"
    clause = ""
    if adjs and rng.random() < 0.25:  # "a circle that is red and striped"
        joined = adjs[0] if len(adjs) == 1 else ", ".join(adjs[:-1]) + " and " + adjs[-1]
        clause = f" that {'are' if plural else 'is'} {joined},"
        head = noun
    else:
        head = " ".join(adjs + [noun])
    if "count" in said:
        det = scene["count"]
    elif plural:
        det = _pick(rng, ["", "some"])
    else:
        det = _article(head)
    noun_phrase = f"{det} {head}".strip() + clause

    tails = []
    if "position" in said:
        tails.append(_pick(rng, _POSITION_PHRASES[scene["position"]]))
    if "background" in said:
        tails.append(_pick(rng, _BACKGROUND_PHRASES).format(scene["background"]))
    if len(tails) > 1 and rng.random() < 0.5:
        tails.reverse()
    tail = "".join(" " + t for t in tails)
    if not tail:
        noun_phrase = noun_phrase.rstrip(",")
    frame = _pick(rng, _FRAMES)
    return frame.format(np=noun_phrase, tail=tail, be="are" if plural else "is")


# --------------------------------------------------------------------------- #
# Datasets
# --------------------------------------------------------------------------- #

_SPLITS = {"train": 0, "test": 1}


def _stream_id(name: str) -> int:
    """Stable per-name integer for seeding (independent of dict order)."""
    return zlib.crc32(name.encode("utf-8"))


def _split_index(split: str) -> int:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return _SPLITS[split]


class ToyTaskDataset(Dataset):
    """Classification task ``task`` (a key of ``TASKS``); items are ``(PIL.Image, label)``.

    Labels are balanced: item ``i`` has label ``i % len(classes)``.
    """

    default_sizes = {"train": 2000, "test": 1000}

    def __init__(
        self,
        task: str,
        split: str = "train",
        size: int | None = None,
        seed: int = 0,
        image_size: int = 32,
        transform=None,
    ) -> None:
        if task not in TASKS:
            raise KeyError(f"unknown toy task {task!r}; choose from {list(TASKS)}")
        self.task = task
        self.info = TASKS[task]
        self.attribute = self.info.attribute
        self.classes: list[str] = list(self.info.classes)
        self.templates: list[str] = list(self.info.templates)
        self.split = split
        self._key = (int(seed), _stream_id(task), _split_index(split))
        self.size = self.default_sizes[split] if size is None else int(size)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.transform = transform
        domain = DOMAIN_SIGNATURES.get(task, {})
        self._weights = {a: w for a, w in domain.get("weights", {}).items() if a != self.attribute}
        self._noise = float(domain.get("noise", 7.0))
        self._rendered: dict[int, np.ndarray] = {}  # item -> pixels (a task's test set is read after every task)

    def __len__(self) -> int:
        return self.size

    @property
    def targets(self) -> list[int]:
        k = len(self.classes)
        return [i % k for i in range(self.size)]

    def _start(self, i: int) -> tuple[np.random.Generator, dict[str, str], int]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = np.random.default_rng([*self._key, i])
        label = i % len(self.classes)
        scene = _sample_scene(rng, self._weights, {self.attribute: self.classes[label]})
        return rng, scene, label

    def scene(self, i: int) -> dict[str, str]:
        """The attribute values of item ``i`` (no rendering)."""
        return self._start(i)[1]

    def render(self, i: int) -> np.ndarray:
        """Item ``i`` as an ``HxWx3`` uint8 array."""
        rng, scene, _ = self._start(i)
        return render_scene(scene, rng, self.image_size, noise_std=self._noise)

    def __getitem__(self, i: int):
        pixels = self._rendered.get(i)
        if pixels is None:  # an item is a pure function of i: render it once, then reuse it (exact)
            pixels = self._rendered[i] = self.render(i)
        img, label = Image.fromarray(pixels), i % len(self.classes)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


class ToyCaptionDataset(Dataset):
    """Image-caption corpus over all attribute combinations; items are ``(PIL.Image, str)``."""

    default_sizes = {"train": 20000, "test": 1000}

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        seed: int = 0,
        image_size: int = 32,
        transform=None,
    ) -> None:
        self.split = split
        self._key = (int(seed), _stream_id("ToyCaptions"), _split_index(split))
        self.size = self.default_sizes[split] if size is None else int(size)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.transform = transform
        self._captions: list[str] | None = None

    def __len__(self) -> int:
        return self.size

    def _start(self, i: int) -> tuple[np.random.Generator, dict[str, str], str]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = np.random.default_rng([*self._key, i])
        scene = sample_scene(rng)
        return rng, scene, caption_for(scene, rng)

    def scene(self, i: int) -> dict[str, str]:
        """The attribute values of item ``i`` (no rendering)."""
        return self._start(i)[1]

    def caption(self, i: int) -> str:
        """Caption of item ``i`` (no rendering)."""
        return self._start(i)[2]

    @property
    def captions(self) -> list[str]:
        """All captions (computed once, without rendering)."""
        if self._captions is None:
            self._captions = [self.caption(i) for i in range(self.size)]
        return self._captions

    def render(self, i: int) -> np.ndarray:
        """Item ``i`` as an ``HxWx3`` uint8 array."""
        rng, scene, _ = self._start(i)
        return render_scene(scene, rng, self.image_size)

    def __getitem__(self, i: int):
        rng, scene, caption = self._start(i)
        img = Image.fromarray(render_scene(scene, rng, self.image_size))
        if self.transform is not None:
            img = self.transform(img)
        return img, caption
