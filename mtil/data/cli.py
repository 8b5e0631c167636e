"""``python -m mtil.data status [NAMES] [--data-location DIR]`` and ``python -m mtil.data prepare NAMES
[--data-location DIR]``.

Every error is one line ``mtil.data: error: ...`` with exit status 2, and every refusal that can be known in
advance (an unknown name, a data folder that is a file, damaged data in the way, files only the user can
download not there yet) is found before anything is written. ``prepare`` goes on with the other names when one
fails, and exits 2 if any did. Ctrl-C stops it with exit status 130; running the same command again resumes.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from mtil.data.catalog import ALIASES, CATALOG, GROUPS, STAGING
from mtil.errors import UserError

DEFAULT_LOCATION = "data"  # as python -m mtil.main's --data-location
PROG = "python -m mtil.data"
_IMAGENET_VIEWS = re.compile(r"ImageNet(Subset|Classes):\d+")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see {PROG} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG, allow_abbrev=False,
        description="Which datasets are under the data folder, and getting the missing ones. "
                    "See docs/getting-data.md.")
    commands = parser.add_subparsers(dest="command", metavar="{status,prepare}")
    status = commands.add_parser(
        "status", allow_abbrev=False, help="list every dataset: present, missing or damaged (writes nothing)",
        description="List every dataset mtil reads (the MTIL datasets, CIFAR10, ImageNet, Conceptual Captions, the "
                    "built-in Toy sets) as present, missing or damaged under --data-location, with image and "
                    "class counts against a complete copy's, and how to get each missing one. Writes nothing.")
    status.add_argument("names", nargs="*", metavar="NAME", help="only these datasets (default: all)")
    prepare = commands.add_parser(
        "prepare", allow_abbrev=False, help="download or lay out datasets, then verify them",
        description="Download what torchvision can download, lay out the rest from files you downloaded, and "
                    "verify each with the checks of 'status'. Safe to run again after an interruption.")
    prepare.add_argument("names", nargs="+", metavar="NAME",
                         help="datasets (space- or comma-separated); MTIL stands for its eleven datasets")
    for sub in (status, prepare):
        sub.add_argument("--data-location", default=DEFAULT_LOCATION, metavar="DIR",
                         help=f"root folder of all datasets, as python -m mtil.main's (default: {DEFAULT_LOCATION})")
    return parser


def resolve_names(words: Sequence[str]) -> list[str]:
    """Catalog names in the order given (each once); one UserError naming every unknown word, with a guess."""
    names, unknown = [], []
    for word in (part for item in words for part in item.split(",") if part.strip()):
        word = word.strip()
        if word in CATALOG:
            names.append(word)
        elif word in GROUPS:
            names += GROUPS[word]
        elif word in ALIASES:
            names.append(ALIASES[word])
        elif _IMAGENET_VIEWS.fullmatch(word):
            names.append("ImageNet")
        else:
            unknown.append(word)
    if unknown:
        raise UserError("; ".join(_unknown(word) for word in unknown) +
                        f"; known: {', '.join(CATALOG)}, or MTIL for the eleven MTIL datasets")
    if not names:
        raise UserError("no dataset named")
    return list(dict.fromkeys(names))


def _unknown(word: str) -> str:
    if word.startswith(("ImageFolder:", "CSV:")):
        return f"{word} is your own data: there is nothing to download (python -m mtil.main reads it where it is)"
    choices = list(CATALOG) + list(GROUPS) + list(ALIASES)
    by_lower = {c.lower(): c for c in choices}
    guess = by_lower.get(word.lower())
    if guess is None:
        close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
        guess = by_lower[close[0]] if close else None
    return f"unknown dataset {word!r}" + (f" (did you mean {guess}?)" if guess else "")


def _location(text: str, writing: bool) -> Path:
    location = Path(text).expanduser()
    if location.exists() and not location.is_dir():
        raise UserError(f"--data-location {text} is a file, not a folder")
    if writing:
        existing = next(p for p in [location, *location.absolute().parents] if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"--data-location {text}: cannot write to {existing}")
    return location


def _flag(args) -> str:
    return "" if args.data_location == DEFAULT_LOCATION else f" --data-location {args.data_location}"


# --------------------------------------------------------------------------------------------- commands
def status_command(args) -> int:
    from mtil.data.check import check
    from mtil.data.report import render

    names = resolve_names(args.names) if args.names else list(CATALOG)
    location = _location(args.data_location, writing=False)
    statuses = [check(name, location) for name in names]
    print("\n".join(render(statuses, location, _flag(args))), flush=True)
    return 0


def prepare_command(args) -> int:
    from mtil.data.prepare import DONE, NOTHING, RUN, PrepareError, plan, run
    from mtil.data.staging import Staging
    from mtil.folder_lock import FolderLock, refuse_if_held

    names = resolve_names(args.names)
    location = _location(args.data_location, writing=True)
    flag = _flag(args)
    refuse_if_held(location / STAGING, flag="--data-location")
    plans, failed = [], 0
    for name in names:  # every refusal that can be known now, before anything is written
        try:
            plans.append(plan(CATALOG[name], location, flag))
        except PrepareError as exc:
            _error(str(exc))
            failed += 1
    writes = any(p.action == RUN or Staging(location, p.facts).exists() for p in plans)
    if writes:
        location.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(location / STAGING, flag="--data-location") if writes else None
    try:
        if lock is not None:
            lock.acquire()
        for item in plans:
            if item.action == NOTHING:
                print(f"{item.facts.name}: generated in memory, nothing to prepare", flush=True)
                continue
            if item.action == DONE:
                run(item, location, flag)  # only tidies what an earlier prepare left
                print(f"{item.facts.name}: already present in {item.status.where}", flush=True)
                continue
            try:
                status = run(item, location, flag, say=lambda text: print(text, flush=True))
            except PrepareError as exc:
                _error(str(exc))
                failed += 1
                continue
            print(f"{item.facts.name}: present in {status.where} (checked)", flush=True)
    finally:
        if lock is not None:
            lock.release()
            try:
                (location / STAGING).rmdir()  # only when nothing was left in it
            except OSError:
                pass
    return 2 if failed else 0


def _error(message: str) -> None:
    print(f"mtil.data: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv:
            raise UserError(f"a command is required: {PROG} status [--data-location DIR] or {PROG} prepare NAMES "
                            f"[--data-location DIR] (see {PROG} --help)")
        args = _parser().parse_args(argv)
        if args.command == "status":
            return status_command(args)
        return prepare_command(args)
    except UserError as exc:
        _error(str(exc))
        return 2
    except BrokenPipeError:  # e.g. `status | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        _error("interrupted: run the same command again to resume (what was downloaded is kept)")
        return 130
