"""Answers that need no model code: ``python -m mtil.main`` with no arguments, ``--help``, and a flag that does not
exist or a value outside a flag's choices, in a fraction of a second instead of the seconds importing torch takes.

The full parser is built from every method's flags, and building it imports the methods, hence torch. So
``make arguments`` also writes ``mtil/assets/cli_spec.json``: the help text and each flag's option strings,
whether it takes a value and its choices, stamped with a fingerprint of mtil's source. When the fingerprint
matches the installed source, these answers come from the file through a parser of the same flags without their
types (so its messages are argparse's own, word for word); values are checked later by the full parser. When it
does not match (a source edited since), nothing is answered here and the full parser does everything.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from mtil.errors import UserError
from mtil.flags import _OneLineParser

PACKAGE = Path(__file__).resolve().parent
SPEC_FILE = PACKAGE / "assets" / "cli_spec.json"
HELP_COLUMNS = 100  # the help text is formatted once, at this width
NO_ARGUMENTS = ("nothing to do. usage: python -m mtil.main --train-dataset NAMES --iterations N [flags] (train a "
                "sequence), or --eval-only [flags] (evaluate); e.g. --model toyclip --train-dataset ToyShape,ToyColor "
                "--iterations 100; --help lists every flag, and `make demo` runs the built-in benchmark")
PLUGINS_ENV = "MTIL_PLUGINS"  # as mtil.registry reads it (not imported here: it imports every method)


def source_fingerprint() -> str:
    """SHA-256 of every Python file of the package (path and bytes): any edit makes the spec stale."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def spec_of(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """What the quick answers need of ``parser`` (mtil.main's full parser)."""
    formatter_width = HELP_COLUMNS - 2
    formatter = parser.formatter_class
    parser.formatter_class = lambda prog: formatter(prog, width=formatter_width)
    try:
        help_text, usage = parser.format_help(), parser.format_usage()
    finally:
        parser.formatter_class = formatter
    flags = [{"options": list(a.option_strings), "dest": a.dest, "nargs": a.nargs,
              "choices": [str(c) for c in a.choices] if a.choices else None}
             for a in parser._actions if a.option_strings and a.dest != "help"]
    return {"fingerprint": source_fingerprint(), "prog": parser.prog, "usage": usage, "help": help_text,
            "flags": flags}


def write_spec(parser: argparse.ArgumentParser, path: Path = SPEC_FILE) -> None:
    path.write_text(json.dumps(spec_of(parser), indent=1, sort_keys=True) + "\n")


def load_spec(path: Path = SPEC_FILE) -> dict[str, Any] | None:
    """The spec, when it describes the source installed (else None: answer nothing here)."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(spec, dict) or spec.get("fingerprint") != source_fingerprint():
        return None
    return spec


def light_parser(spec: dict[str, Any]) -> argparse.ArgumentParser:
    """A parser of the spec's flags, values unconverted: argparse's own messages for unknown flags, missing
    values and choices."""
    parser = _OneLineParser(prog=spec["prog"], add_help=False, allow_abbrev=False)
    for flag in spec["flags"]:
        nargs = flag["nargs"]
        if nargs == 0:
            parser.add_argument(*flag["options"], dest=flag["dest"], action="store_const", const=True)
        else:
            parser.add_argument(*flag["options"], dest=flag["dest"], nargs=nargs, choices=flag["choices"])
    return parser


def quick_answer(argv: Sequence[str], spec: dict[str, Any] | None = None) -> int | None:
    """The exit code when ``argv`` is answered here (no arguments, --help, a flag error), else None."""
    argv = list(argv)
    if not argv:  # the default run (ViT-B/16 on the benchmark) is never what was meant: one line, as every error
        print(f"mtil: error: {NO_ARGUMENTS}", file=sys.stderr)
        return 2
    if os.environ.get(PLUGINS_ENV) or "mtil.registry" in sys.modules:  # flags the spec cannot know: plugins, or
        return None  # methods registered in this process (and torch is imported already: nothing to save)
    spec = spec if spec is not None else load_spec()
    return None if spec is None else answer_from_spec(argv, spec)


def answer_from_spec(argv: list[str], spec: dict[str, Any]) -> int | None:
    """--help, or argparse's own error for an unknown flag, a missing value or a value outside the choices."""
    before_end = argv[:argv.index("--")] if "--" in argv else argv
    if "-h" in before_end or "--help" in before_end:
        print(spec["help"], end="")
        return 0
    try:
        light_parser(spec).parse_args(argv)
    except UserError as exc:
        print("mtil: error: " + str(exc).replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        return 2
    return None
