"""Sinks: where a run's records go besides mtil's own files (TensorBoard, Weights & Biases, ...).

A sink is one file in ``mtil/records/sinks/`` whose class carries ``@register_sink``; ``--report-to`` offers the
names that registered. The records owner (:class:`mtil.records.owner.Records`) hands every sink the same calls,
in the order a run makes them, and only on rank 0:

* ``start(config, resumed_at, replay)`` once, before the first record. ``resumed_at``: the global step the run
  resumes from (None for a fresh run). Everything a killed process recorded after its checkpoint is recorded again
  by the resumed one, so a sink drops what it holds at steps ``>= resumed_at`` and then receives ``replay``: the
  records of step ``resumed_at`` that the checkpoint holds. Each step then appears once.
* ``scalars(step, values)``: a dict of named numbers at a global step: training terms (``train/<term>``,
  ``train/lr``, ``train/images_per_s``, ``train/task``) and evaluations (``eval/<Dataset>/top1``, ``.../top5``,
  ``eval/task``).
* ``matrix(step, table, heatmap)``: the accuracy matrix (a wide DataFrame, rows after each task) and its heat map
  (a PNG file), when the sequence ends.
* ``summary(step, metrics)``: Transfer / Avg / Last (and the other metrics), when the sequence ends.
* ``flush()``: before every checkpoint is written: what the checkpoint says was recorded must be on disk (a
  resumed run replays only its own step, and a kill -9 loses whatever a tracker still buffers).
* ``close(failed)``: always; ``failed`` when the run stops on an error (a stop request that saved a checkpoint
  is no failure: the run resumes).

A sink's ``check()`` runs while the flags are checked, before anything is written: a tracker that is not
installed is one line naming what to install.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, ClassVar

from mtil.errors import UserError

Scalars = dict[str, float]


class Sink:
    """The interface; every call is optional (the default does nothing)."""

    name: ClassVar[str] = ""
    install: ClassVar[str] = ""  # what to install when the tracker is missing, e.g. "pip install tensorboard"
    may_fail_to_start: ClassVar[bool] = False  # a service that can refuse (W&B without a login): started first

    def __init__(self, folder: Path, run_name: str):
        self.folder = Path(folder)  # the run's --save folder
        self.run_name = run_name

    @classmethod
    def check(cls) -> None:
        """Raise UserError (one line: what to install) when this sink cannot work here."""

    def start(self, config: dict[str, Any], resumed_at: int | None, replay: list[tuple[int, Scalars]]) -> None:
        """Before the first record (see the module's docstring for ``resumed_at`` and ``replay``)."""

    def scalars(self, step: int, values: Scalars) -> None:
        """Named numbers at a global step."""

    def matrix(self, step: int, table, heatmap: Path | None) -> None:
        """The accuracy matrix (wide DataFrame) and its heat map, at the end of the sequence."""

    def summary(self, step: int, metrics: Scalars) -> None:
        """Transfer / Avg / Last and the other metrics, at the end of the sequence."""

    def flush(self) -> None:
        """Make what was recorded so far durable (called before each checkpoint is written)."""

    def close(self, failed: bool = False) -> None:
        """Flush and release; called on every exit (``failed``: the run ended on an error)."""


_SINKS: dict[str, type[Sink]] = {}
_IMPORT_FAILURES: dict[str, str] = {}
_discovered = False


def register_sink(cls: type[Sink]) -> type[Sink]:
    """Class decorator: make ``cls`` available to ``--report-to`` as ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    _SINKS[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of ``mtil.records.sinks`` once; a module that fails to import is remembered, not
    fatal (its name then reports the failure)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import mtil.records.sinks as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        try:
            importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - one broken sink file must not break the CLI
            _IMPORT_FAILURES[info.name] = f"{type(exc).__name__}: {exc}"


def sink_names() -> list[str]:
    _discover()
    return sorted(_SINKS)


def sink_class(name: str) -> type[Sink]:
    _discover()
    if name not in _SINKS:
        failed = "; ".join(f"{module}: {error}" for module, error in _IMPORT_FAILURES.items())
        raise UserError(f"--report-to: unknown tracker {name!r}; accepted: {', '.join(sorted(_SINKS)) or 'none'}"
                        + (f" (sink files that failed to import: {failed})" if failed else ""))
    return _SINKS[name]


def check_report_to(names: list[str]) -> None:
    """Every named tracker is known and usable here; one line otherwise. Runs before anything is written."""
    for name in names:
        sink_class(name).check()
