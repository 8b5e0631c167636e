"""The base command of a sweep and the command of each point, checked before anything runs.

A point's command is the base command, then one flag per axis (``--lr=1e-4``; an on/off flag as ``--we`` or
``--no-we``), then ``--seed S`` (and ``--fewshot-seed S`` when the point uses ``--shots``) for a seed, then
``--save <out>/<point>``. When the base command is mtil's own (``python -m mtil.main ...`` or ``mtil ...``), every
point's command is parsed and checked by mtil's parser here, so an unknown flag, a bad value or a flag that would
do nothing is a one-line error naming the point before the first point runs; ``python`` there means the Python
running the sweep. Any other program is run as given: it must accept ``--save DIR`` and write its results there
(see :func:`mtil.evaluation.fewshot_report.final_results`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mtil.errors import UserError
from mtil.sweep.grid import VARIANT_AXIS, Point

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass
class BaseCommand:
    program: list[str]  # what runs: [python, -m, mtil.main], or the whole command of another program
    flags: list[str]  # mtil's flags (empty for another program)
    mtil: bool

    def text(self) -> str:
        return " ".join(shlex.quote(t) for t in [*self.program, *self.flags])


def parse_base(text: str) -> BaseCommand:
    """``python -m mtil.main --model toyclip ...``, ``mtil ...``, or any other command."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise UserError(f"--base {text!r}: {exc} (quote it as one shell word)") from None
    if not tokens:
        raise UserError("--base is empty: give the command to sweep, e.g. --base 'python -m mtil.main ...'")
    name = Path(tokens[0]).name
    if len(tokens) >= 3 and name.startswith("python") and tokens[1:3] == ["-m", "mtil.main"]:
        return BaseCommand([sys.executable, "-m", "mtil.main"], tokens[3:], True)
    if name == "mtil":
        return BaseCommand([sys.executable, "-m", "mtil.main"], tokens[1:], True)
    return BaseCommand(tokens, [], False)


def without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without the given value-taking flags and their values (``--save X`` and ``--save=X``)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in flags:
            skip = True
        elif not any(token.startswith(f + "=") for f in flags):
            out.append(token)
    return out


@dataclass
class PointCommand:
    point: Point
    argv: list[str]  # the whole command
    save: Path
    args: argparse.Namespace | None = field(default=None, repr=False)  # mtil's parsed flags (an mtil command)

    @property
    def text(self) -> str:
        return " ".join(shlex.quote(t) for t in self.argv)


class Planner:
    """Builds and checks every point's command against the base command (mtil's parser for an mtil command)."""

    def __init__(self, base: BaseCommand, keys: list[str], seeds: bool,
                 variants: dict[str, tuple[str, ...]] | None = None, sample_seed: int | None = None):
        self.base = base
        self.variants = variants or {}
        # --eval-sample-seed for every point of a seed sweep whose command samples its evaluation
        # (--max-evaluation-size): the spread over seeds is then the training's, not the sample's
        self.sample_seed = sample_seed
        self.notes: list[str] = []
        self.actions: dict[str, argparse.Action] = {}
        if not base.mtil:
            return
        from mtil.args import _given, build_parser

        parser = build_parser()
        self.actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
        try:
            given = _given(parser, base.flags)
        except UserError as exc:
            raise UserError(f"--base: {exc}") from None
        for dest, why in (("save", "the sweep gives every point its own --save (under --out)"),
                          ("seeds", "give --seeds to the sweep, which runs each seed as a point")):
            if dest in given:
                raise UserError(f"--base sets --{dest}: {why}; drop it from --base")
        if seeds:
            typed = [f"--{d.replace('_', '-')}" for d in ("seed", "fewshot_seed") if d in given]
            if typed:
                raise UserError(f"--seeds sets every point's --seed (and --fewshot-seed): drop {', '.join(typed)} "
                                f"from --base")
        for name, tokens in self.variants.items():
            self._check_variant(parser, given, keys, seeds, name, list(tokens))
        for key in keys:
            if key == VARIANT_AXIS:
                continue
            dest = key.replace("-", "_")
            if dest not in self.actions:
                raise UserError(f"--grid {key}: mtil.main has no flag --{key} (see python -m mtil.main --help)")
            if dest in given:
                raise UserError(f"--{key} is both in --base and in the grid: drop it from --base")

    def _check_variant(self, parser: argparse.ArgumentParser, base: set[str], keys: list[str], seeds: bool,
                       name: str, tokens: list[str]) -> None:
        """A variant's flags parse, and set nothing the base, the grid or the sweep sets."""
        from mtil.args import _given

        where = f"--variant {name}"
        try:
            given = _given(parser, tokens)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        taken = {"save": "the sweep gives every point its own --save",
                 "seeds": "give --seeds to the sweep, which runs each seed as a point"}
        if seeds:
            taken.update(seed="--seeds sets it", fewshot_seed="--seeds sets it")
        for dest in sorted(given):
            flag = "--" + dest.replace("_", "-")
            if dest in taken:
                raise UserError(f"{where} sets {flag}: {taken[dest]}; drop it from the variant")
            if dest in base:
                raise UserError(f"{where} sets {flag}, which --base sets too: drop it from one of them")
            if dest.replace("_", "-") in keys:
                raise UserError(f"{where} sets {flag}, which the grid varies: drop it from the variant")

    def _flag_tokens(self, key: str, value: str) -> list[str]:
        action = self.actions.get(key.replace("-", "_"))
        if action is None:
            return [f"--{key}={value}"]
        flag = action.option_strings[0]
        from mtil.flags import Switch

        if isinstance(action, Switch):
            if value.lower() in TRUE:
                return [flag]
            if value.lower() in FALSE:
                return ["--no-" + flag[2:]]
            raise UserError(f"--grid {key}: --{key} is on or off, so its values are true or false, got {value!r}")
        return [f"{flag}={value}"]

    def _parse(self, point: Point, flags: list[str]) -> argparse.Namespace:
        from mtil.args import parse_args

        notes = io.StringIO()
        try:
            with contextlib.redirect_stderr(notes):
                return parse_args(flags)
        except UserError as exc:
            raise UserError(f"point {point.name}: {exc}") from None
        finally:
            self.notes += [n for n in notes.getvalue().splitlines() if n and n not in self.notes]

    def command(self, point: Point, save: Path) -> PointCommand:
        flags = list(self.base.flags)
        for key, value in point.values.items():
            flags += list(self.variants[value]) if key == VARIANT_AXIS else self._flag_tokens(key, value)
        tail = ["--save", str(save)]
        if point.seed is not None:
            if self.base.mtil:
                uses_shots = self._parse(point, flags + tail).shots is not None
            else:
                uses_shots = any(t == "--shots" or t.startswith("--shots=") for t in self.base.program + flags)
            seed = str(point.seed)
            flags += ["--seed", seed] + (["--fewshot-seed", seed] if uses_shots else [])
            names = {t.split("=")[0].replace("_", "-") for t in flags}
            if self.base.mtil and self.sample_seed is not None and "--max-evaluation-size" in names \
                    and "--eval-sample-seed" not in names:  # one evaluation sample for every seed
                flags += ["--eval-sample-seed", str(self.sample_seed)]
        args = self._parse(point, flags + tail) if self.base.mtil else None
        return PointCommand(point, [*self.base.program, *flags, *tail], save, args)
