"""Flag primitives: declaring a flag (both spellings, on/off switches, roles) and the typed validators.

A leaf module (the standard library and :mod:`mtil.errors` only), so method files, the engine and the CLI can all
use it without depending on the parser of :mod:`mtil.args`.

**Roles.** What the engine needs to know about a flag is declared with the flag, never listed by name elsewhere:
``add_flag(group, "--workers", ..., role="operational")``. The roles (:data:`ROLES`):

* ``operational``: changes how a run executes, not what it computes (it may differ on resume);
* ``shapes_optimizer``: decides which parameters the optimiser holds (an interrupted task cannot continue across a
  change of it);
* ``model``: names a model or a file (a model name stays a name, an existing file compares as its resolved path);
* ``dataset``: names datasets (``ImageFolder:path`` entries compare as resolved paths);
* ``path``: names a file or folder (compared as resolved paths on resume); ``path=True`` is shorthand.

:func:`mtil.args.parse_args` records them on the namespace as ``_roles`` (role -> sorted dests); the engine reads
them with :func:`flags_with_role` or receives that mapping from its caller.
"""
from __future__ import annotations

import argparse
import difflib
import re
import math
from typing import Any, Iterable, Mapping

from mtil.errors import UserError

ROLES = ("operational", "shapes_optimizer", "model", "dataset", "path")


def close_matches(word: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """The candidates closest to ``word`` (a typo, another case, ``_`` for ``-``), best first."""
    by_key: dict[str, str] = {}
    for candidate in candidates:
        by_key.setdefault(candidate.lower().replace("_", "-"), candidate)
    key = word.lower().replace("_", "-")
    if key in by_key:
        return [by_key[key]]
    return [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=limit, cutoff=0.6)]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest candidates, or ``""``."""
    matches = close_matches(word, candidates)
    return f" (did you mean {' or '.join(matches)}?)" if matches else ""


_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<tokens>.*)$")
_INVALID_CHOICE = re.compile(r"^argument (?P<flag>\S+): invalid choice: '(?P<value>[^']*)' \(choose from (?P<choices>.*)\)$")


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (``mtil: error: ...``) with exit code 2, with the flag or value
    the user probably meant."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise UserError(f"{message}{self._suggestion(message)} (see --help)")

    def _suggestion(self, message: str) -> str:
        unrecognized = _UNRECOGNIZED.match(message)
        if unrecognized:
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = [f"{token.split('=')[0]} -> {' or '.join(matches)}"
                     for token in unrecognized["tokens"].split() if token.startswith("-")
                     if (matches := close_matches(token.split("=")[0], flags))]
            return f" (did you mean: {', '.join(hints)}?)" if hints else ""
        invalid = _INVALID_CHOICE.match(message)
        if invalid:
            return did_you_mean(invalid["value"], re.findall(r"'([^']*)'", invalid["choices"]))
        return ""


def _spellings(flag: str) -> list[str]:
    """``--image-loss`` -> ``['--image-loss', '--image_loss']``; single words give one spelling."""
    body = flag[2:]
    variants = [flag]
    for a, b in (("-", "_"), ("_", "-")):
        other = "--" + body.replace(a, b)
        if other not in variants:
            variants.append(other)
    return variants


class Switch(argparse.Action):
    """An on/off flag: ``--we`` turns it on, ``--no-we`` (or ``--no_we``) off, so the command line can switch off
    what a ``--config`` file switched on."""

    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        names = list(option_strings)
        for option in option_strings:
            body = option[2:]
            names += [n for n in ("--no-" + body.replace("_", "-"), "--no_" + body.replace("-", "_"))
                      if n not in names]
        super().__init__(names, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith(("--no-", "--no_")))


def add_flag(group, flag: str, *extra: str, path: bool = False, role: str | Iterable[str] = (),
             **kwargs) -> argparse.Action:
    """Add a flag under both spellings, with its roles (one of :data:`ROLES` or several); ``path=True`` is the
    role ``path``. Method files use this for their own flags."""
    roles = {role} if isinstance(role, str) else set(role)
    if path:
        roles.add("path")
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise ValueError(f"{flag}: unknown role(s) {unknown}; roles: {', '.join(ROLES)}")
    names: list[str] = []
    for f in (flag, *extra):
        names += [n for n in _spellings(f) if n not in names]
    kwargs.setdefault("dest", flag[2:].replace("-", "_"))
    if kwargs.get("action") == "store_true":  # --flag / --no-flag: the command line can switch off a file's "true"
        kwargs["action"] = Switch
    action = group.add_argument(*names, **kwargs)
    action.roles = frozenset(roles)
    action.is_path = "path" in roles
    return action


def roles_of(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """role -> sorted dests of the parser's flags declared with it (every role of :data:`ROLES` present)."""
    return {role: sorted({a.dest for a in parser._actions if role in getattr(a, "roles", ())}) for role in ROLES}


def flags_with_role(source: Any, role: str, default: Iterable[str] | None = None) -> set[str]:
    """Dests of the flags declared with ``role``.

    ``source``: a namespace from :func:`mtil.args.parse_args` (its ``_roles``) or a role -> dests mapping (such as
    that ``_roles``; a role it lacks has no flags). A namespace without ``_roles`` (built by hand, e.g. in a test)
    gets ``default`` when given, else a LookupError: reading it as "no flag has this role" would be unsafe for some
    roles (no ``shapes_optimizer`` flag would let a resume carry an optimiser over other parameters), and the
    engine must not build the parser to find out."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    roles = source if isinstance(source, Mapping) else getattr(source, "_roles", None)
    if roles is None:
        if default is not None:
            return set(default)
        raise LookupError(f"{type(source).__name__} has no _roles: parse it with mtil.args.parse_args, or pass the "
                          f"role -> flags mapping (or a default)")
    return set(roles.get(role, ()))


def _checked(convert, accept, requirement: str, name: str):
    """An argparse type: ``convert`` the text, then require ``accept(value)`` (argparse reports the flag)."""

    def parse(text: str):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = name
    return parse


INT_MAX = 2**31 - 1  # counts and sizes beyond this are typos, and overflow torch's and itertools' C integers
positive_int = _checked(int, lambda v: 1 <= v <= INT_MAX, f"an integer from 1 to {INT_MAX}", "positive_int")
non_negative_int = _checked(int, lambda v: 0 <= v <= INT_MAX, f"an integer from 0 to {INT_MAX}", "non_negative_int")
seed_int = _checked(int, lambda v: 0 <= v < 2**32, f"an integer from 0 to {2**32 - 1} (what NumPy accepts)", "seed_int")
MAX_WORKERS = 128  # beyond any machine's useful loader processes; a typo of 1000s would fork until memory runs out
worker_count = _checked(int, lambda v: 0 <= v <= MAX_WORKERS, f"an integer from 0 to {MAX_WORKERS}", "worker_count")
INTEGER_TYPES = (int, positive_int, non_negative_int, worker_count, seed_int)
positive_float = _checked(float, lambda v: v > 0, "a positive number", "positive_float")
non_negative_float = _checked(float, lambda v: v >= 0, "a number of 0 or more", "non_negative_float")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]", "unit_interval")
open_unit_interval = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1), e.g. 0.999", "open_unit_interval")
half_open_unit = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)", "half_open_unit")
label_smoothing = half_open_unit
dropout = half_open_unit
energy_fraction = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]", "energy_fraction")


def name_list(text: str) -> list[str]:
    """``'a, b,,c'`` -> ``['a', 'b', 'c']``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def seed_list(text: str) -> list[int]:
    """``'1,2,3'`` -> ``[1, 2, 3]``: distinct seeds (argparse reports the flag)."""
    seeds = [seed_int(item) for item in name_list(text)]
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, e.g. 1,2,3, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed appears twice in {text!r}")
    return seeds


LR_PARTS = ("image", "text", "head")


def lr_multipliers(text: str) -> dict[str, float]:
    """``image=1,text=0.1,head=10`` -> {part: factor}; parts: image, text, head (argparse reports the flag)."""
    out: dict[str, float] = {}
    for item in name_list(text):
        part, _, value = item.partition("=")
        part = part.strip()
        if part not in LR_PARTS:
            raise argparse.ArgumentTypeError(f"unknown part {part!r} in {item!r}; parts: {', '.join(LR_PARTS)}")
        try:
            factor = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected PART=NUMBER, e.g. text=0.1") from None
        if not math.isfinite(factor) or factor < 0:
            raise argparse.ArgumentTypeError(f"{item!r}: the factor must be a number of 0 or more")
        out[part] = factor
    return out


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, unless the default is None or the help already states its default
    (``(default: supervised 128, dino 40)``), and the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or not action.option_strings \
                or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"
