"""Methods and components by name: registration, discovery, their flags, and the checks across them.

A method or component is one file in ``mtil/methods/`` (or a plugin module named in ``MTIL_PLUGINS``, a
comma-separated list of module names or ``.py`` paths) whose class carries ``@register``. Nothing else lists
their names: ``--method`` offers what registered, the parser gets each class's flags in the class's own argument
group, and the runner receives the components this module builds. A method file that fails to import does not
break the CLI: the other methods still work, and naming a missing method reports the import error.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback
from pathlib import Path
from mtil.engine.method import Method
from mtil.errors import UserError
from mtil.flags import did_you_mean

PLUGINS_ENV = "MTIL_PLUGINS"

_REGISTRY: dict[str, type[Method]] = {}
_IMPORT_FAILURES: dict[str, str] = {}  # module -> "ExceptionType: message" of a method file that failed to import
_discovered = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available by ``cls.name`` (re-registering the same class replaces it)."""
    if cls.kind not in ("method", "component"):
        raise TypeError(f"{cls.__name__}.kind must be 'method' or 'component', not {cls.kind!r}")
    previous = _REGISTRY.get(cls.name)
    if previous is not None and (previous.__module__, previous.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"two classes register the name {cls.name!r}: {previous.__module__}.{previous.__qualname__} "
                         f"and {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Import every module of ``mtil.methods`` and every ``MTIL_PLUGINS`` entry (once per process)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import mtil.methods as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        _import(f"{package.__name__}.{info.name}")
    for entry in filter(None, (e.strip() for e in os.environ.get(PLUGINS_ENV, "").split(","))):
        _import(entry)


def _import(entry: str) -> None:
    try:
        if entry.endswith(".py"):
            path = Path(entry).expanduser().resolve()
            name = f"mtil_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(entry)
    except Exception as exc:  # one broken method file must not take the whole CLI down
        _IMPORT_FAILURES[entry] = f"{type(exc).__name__}: {exc}"
        print(f"mtil: warning: {entry} failed to import ({type(exc).__name__}: {str(exc)[:200]}); its methods and "
              f"flags are unavailable (MTIL_DEBUG=1 shows the traceback)", file=sys.stderr)
        if os.environ.get("MTIL_DEBUG"):
            traceback.print_exc()


def registered(kind: str | None = None) -> dict[str, type[Method]]:
    discover()
    return {n: c for n, c in _REGISTRY.items() if kind is None or c.kind == kind}


def method_names() -> list[str]:
    return sorted(registered("method"), key=str.lower)


def import_failures() -> dict[str, str]:
    discover()
    return dict(_IMPORT_FAILURES)


def _components_in_order() -> list[type[Method]]:
    return sorted(registered("component").values(), key=lambda c: (c.order, c.name))


# ---------------------------------------------------------------------------------------------- flags
def add_arguments(parser: argparse.ArgumentParser) -> dict[str, type]:
    """Add every registered class's flags, each class in its own group; returns dest -> owning class.

    A class owns the flags its own ``add_arguments`` adds (inherited flags belong to the base that adds them, so
    ZSCL, LwF and iCaRL share the distillation flags of their common base).
    """
    owners: dict[str, type] = {}
    done: set[type] = set()
    classes = [registered("method")[n] for n in method_names()] + _components_in_order()
    for cls in classes:
        for klass in reversed(cls.__mro__):
            if klass in done or "add_arguments" not in vars(klass) or not issubclass(klass, Method):
                continue
            done.add(klass)
            if klass.flag_group is None:
                continue
            title, description = klass.flag_group
            group = parser.add_argument_group(title, description)
            before = set(id(a) for a in group._group_actions)
            klass.add_arguments(group)
            for action in group._group_actions:
                if id(action) not in before:
                    owners[action.dest] = klass
    return owners


# ---------------------------------------------------------------------------------------------- building
def method_class(name: str) -> type[Method]:
    methods = registered("method")
    if name not in methods:
        failed = "; ".join(f"{m} failed to import ({e})" for m, e in import_failures().items())
        raise UserError(f"unknown --method {name!r}{did_you_mean(name, method_names())}; accepted: "
                        f"{', '.join(method_names())}"
                        + (f" (also: {failed})" if failed else ""))
    return methods[name]


def active_classes(config: argparse.Namespace) -> list[type[Method]]:
    """The method, then the components its flags turn on, in hook order."""
    return [method_class(config.method)] + [c for c in _components_in_order() if c.enabled(config)]


def build_components(config: argparse.Namespace) -> list[Method]:
    """Instances of the active classes, method first (the runner receives these; the engine imports none)."""
    return [cls(config) for cls in active_classes(config)]


# ---------------------------------------------------------------------------------------------- checks
def _label(cls: type[Method]) -> str:
    return f"--method {cls.name}" if cls.kind == "method" else f"{cls.summary or cls.name} ({cls.enable_flag})"


def check_combination(config: argparse.Namespace, world_size: int = 1) -> None:
    """Method / train mode / component compatibility and each active class's own checks (a UserError)."""
    active = active_classes(config)
    method, components = active[0], active[1:]
    for cls in active:
        if config.train_mode not in cls.train_modes:
            note = f" ({cls.train_modes_note})" if cls.train_modes_note else ""
            raise UserError(f"{_label(cls)} does not work with --train-mode {config.train_mode}{note}; it works "
                            f"with: {', '.join(cls.train_modes)}")
    if method.works_with is not None:
        for cls in components:
            if cls.name not in method.works_with:
                allowed = ", ".join(registered("component")[n].enable_flag for n in method.works_with
                                    if n in registered("component")) or "none"
                raise UserError(f"--method {method.name} does not combine with {cls.summary or cls.name} "
                                f"({cls.enable_flag}); components it takes: {allowed}")
    for i, a in enumerate(components):
        for b in components[i + 1:]:
            reason = a.conflicts.get(b.name) or b.conflicts.get(a.name)
            if reason:
                raise UserError(f"{a.enable_flag} and {b.enable_flag} cannot run together: {reason}")
    if world_size > 1:
        unable = [cls for cls in active if not cls.supports_distributed]
        if unable:
            raise UserError(f"{world_size} processes were started (WORLD_SIZE / srun), but "
                            f"{', '.join(_label(c) for c in unable)} has not declared that it works on several "
                            f"processes: run it as one process")
    defaults = getattr(config, "_defaults", {})
    for cls in active:
        for dest, needed in cls.requires.items():
            if dest in defaults and getattr(config, dest) != defaults[dest] and not getattr(config, needed):
                flag, other = (f"--{d.replace('_', '-')}" for d in (dest, needed))
                raise UserError(f"{flag} refines {other}: give {other} too (or drop {flag})")
        cls.check_config(config)


def inert_flags(config: argparse.Namespace, owners: dict[str, type], defaults: dict[str, object]) -> list[tuple]:
    """(dest, owner) of flags set away from their default whose owner is not active: they would do nothing."""
    active = active_classes(config)
    live = {klass for cls in active for klass in cls.__mro__}
    return [(dest, owner) for dest, owner in owners.items()
            if owner not in live and getattr(config, dest, None) != defaults.get(dest)]


def inactive_flags(config: argparse.Namespace, owners: dict[str, type]) -> set[str]:
    """Every flag whose owner is not active: its value cannot change this run."""
    live = {klass for cls in active_classes(config) for klass in cls.__mro__}
    return {dest for dest, owner in owners.items() if owner not in live}


def inert_message(flag: str, owner: type, config: argparse.Namespace) -> str:
    """Why a flag does nothing in this command, and what to do."""
    if owner.kind == "component":
        comp = next(c for c in _components_in_order() if issubclass(c, owner))
        return (f"{flag} belongs to {comp.summary or comp.name} ({comp.enable_flag}), which this command does "
                f"not turn on: give {comp.enable_flag} too, or drop {flag}")
    users = [n for n in method_names() if issubclass(registered("method")[n], owner)]
    return (f"{flag} belongs to --method {' / '.join(users)}, not --method {config.method}: drop {flag} (or use "
            f"{'that method' if len(users) == 1 else 'one of those methods'})")
