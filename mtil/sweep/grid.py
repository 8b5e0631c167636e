"""A sweep's grid: axes of flag values (``--grid lr=1e-5,1e-4``, or a YAML file), the seeds, and the points.

A point is one value per axis; its folder name lists them in axis order, ``key=value`` joined by ``_``, with the
seed last as ``seed<S>`` (``shots=2_lr=1e-4_seed1``; a run of ``--seeds`` alone: ``seed1``). Seeds vary fastest,
so a setting's seeds finish together.

The ``variant`` axis (``--variant NAME=FLAGS``, always the first) is not one flag: each of its values names a
bundle of flags (``ast="--method ast --k 4"``), so methods whose flags differ (zero-shot takes no learning rate)
share one sweep and one table.
"""
from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtil.errors import UserError
from mtil.yaml_files import read_yaml

SEED_AXIS = "seed"  # the name of --seeds' axis in tables
VARIANT_AXIS = "variant"  # the axis of --variant NAME=FLAGS: each value names a bundle of flags
RESERVED = {"save": "the sweep gives every point its own --save", "seeds": "give --seeds to the sweep itself"}
# Axes that are seeds: tables average over them (grouped by every other axis).
SEED_KEYS = ("seed", "fewshot-seed")


@dataclass(frozen=True)
class Axis:
    key: str  # the flag without dashes, hyphenated (``fewshot-seed``)
    values: tuple[str, ...]
    bundles: tuple[tuple[str, ...], ...] | None = None  # the variant axis: each value's flags


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """``NAME=FLAGS`` (``ast=--method ast --k 4``): a name for the table and the flags it adds."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UserError(f"--variant {text!r}: expected NAME=FLAGS (e.g. --variant 'zeroshot=--method zeroshot')")
    if _safe(name) != name:
        raise UserError(f"--variant {text!r}: the name {name!r} must be letters, digits or .+- characters "
                        f"(it names the points' folders)")
    try:
        tokens = tuple(shlex.split(flags))
    except ValueError as exc:
        raise UserError(f"--variant {text!r}: {exc}") from None
    if not tokens:
        raise UserError(f"--variant {text!r}: give the flags of {name} after '=' (e.g. {name}=--method zeroshot)")
    return name, tokens


def variant_axis(variants: list[tuple[str, tuple[str, ...]]]) -> Axis:
    """The variant axis from ``--variant`` options (or a grid file's ``variant:`` mapping)."""
    names = [n for n, _ in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--variant {repeated[0]} is given twice: give each variant one name")
    return Axis(VARIANT_AXIS, tuple(names), tuple(flags for _, flags in variants))


@dataclass(frozen=True)
class Point:
    values: dict[str, str] = field(hash=False)  # grid axis -> value, in axis order
    seed: int | None = None  # from --seeds (which sets --seed, and --fewshot-seed under --shots)

    @property
    def name(self) -> str:
        """Its folder name: ``shots=2_lr=1e-4_seed1``."""
        parts = [f"{k}={_safe(v)}" for k, v in self.values.items()]
        return "_".join(parts + ([f"seed{self.seed}"] if self.seed is not None else []))

    @property
    def columns(self) -> dict[str, str]:
        """What the point is, as table columns (the seed, when --seeds gave it, as ``seed``)."""
        return {**self.values, **({SEED_AXIS: str(self.seed)} if self.seed is not None else {})}


def _safe(value: str) -> str:
    """A value as part of a folder name: path separators and other odd characters become ``-``."""
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", value) or "empty"


def normal_key(text: str) -> str:
    return text.strip().lstrip("-").replace("_", "-")


def parse_axis(text: str) -> Axis:
    """``lr=1e-5,1e-4`` (values with commas: separate them with ``;``, e.g. ``train-dataset=A,B;C``)."""
    key, sep, values = text.partition("=")
    key = normal_key(key)
    if not sep or not key:
        raise UserError(f"--grid {text!r}: expected FLAG=V1,V2,... (e.g. --grid lr=1e-5,1e-4)")
    separator = ";" if ";" in values else ","
    return _axis(key, [v.strip() for v in values.split(separator)], f"--grid {text!r}")


def _axis(key: str, values: list[str], where: str) -> Axis:
    if not values or any(v == "" for v in values):
        raise UserError(f"{where}: {key} has an empty value; give one or more values, e.g. {key}=1,2")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"{where}: {key} lists {', '.join(repeated)} twice")
    return Axis(key, tuple(values))


def axes_from_file(path: str | Path) -> list[Axis]:
    """A YAML grid file: ``{lr: [1.0e-5, 1.0e-4], shots: [1, 2]}`` (a single value is an axis of one)."""
    document = read_yaml(path, "--grid-file")
    if not isinstance(document, dict) or not document:
        raise UserError(f"--grid-file {path} must map flags to lists of values (e.g. 'lr: [1.0e-5, 1.0e-4]')")
    axes = []
    for key, values in document.items():
        if normal_key(str(key)) == VARIANT_AXIS:
            if not isinstance(values, dict) or not values:
                raise UserError(f"--grid-file {path}: variant must map names to flags (ast: --method ast --k 4)")
            axes.insert(0, variant_axis([parse_variant(f"{name}={flags}") for name, flags in values.items()]))
            continue
        values = values if isinstance(values, list) else [values]
        if any(isinstance(v, (dict, list)) or v is None for v in values):
            raise UserError(f"--grid-file {path}: {key} must list plain values (numbers, words, true/false)")
        axes.append(_axis(normal_key(str(key)), [_text(v) for v in values], f"--grid-file {path}"))
    return axes


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_axes(axes: list[Axis], seeds: list[int] | None) -> None:
    """Keys given twice, reserved keys, and seeds given both ways are one-line errors."""
    keys = [a.key for a in axes]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UserError(f"the grid names {', '.join(twice)} twice: give each flag one axis")
    if any(a.key == VARIANT_AXIS and a.bundles is None for a in axes):
        raise UserError("--grid variant: a variant is a bundle of flags; give each as --variant NAME=FLAGS")
    for key in keys:
        if key in RESERVED:
            raise UserError(f"the grid cannot vary --{key}: {RESERVED[key]}")
    if seeds:
        both = [k for k in keys if k in SEED_KEYS]
        if both:
            raise UserError(f"--seeds sets every point's --seed and --fewshot-seed: drop the grid's "
                            f"{', '.join(both)} axis (or drop --seeds)")


def expand(axes: list[Axis], seeds: list[int] | None = None) -> list[Point]:
    """Every combination of the axes' values (the first axis slowest), each with every seed (fastest)."""
    names = [a.key for a in axes]
    points = [Point(dict(zip(names, combination)), seed)
              for combination in itertools.product(*(a.values for a in axes)) for seed in seeds or [None]]
    names_seen = [p.name for p in points]
    clashes = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if clashes:
        raise UserError(f"grid values give points the same folder name ({clashes[0]}): values must differ in "
                        f"letters, digits or .+=- characters")
    return points


def seed_columns(points: list[Point]) -> list[str]:
    """The columns the tables average over: the seeds (--seeds' and seed axes of the grid)."""
    keys = list(points[0].columns) if points else []
    return [k for k in keys if k in SEED_KEYS]
