"""Records that survive damage: before a run resumes, and before ``--summarize`` rewrites a folder's tables, each
metric file is checked against the records it must hold.

``results.jsonl`` is the journal (every evaluation, appended); ``accuracy_matrix.csv`` and ``metrics_<X>.csv``
are derived from it. So:

* a derived file that is unreadable, short, or disagrees with the journal is rebuilt from it (identical to what
  the run wrote: the same rows, the same rounding), with a warning naming it;
* a journal that lost records (cells and rows the derived files hold that it lacks) cannot be rebuilt from the
  derived files (they lack what it records): the run stops with one line naming it, and the damaged lines in it;
* a line that is no record (torn by a kill mid-append, or garbled) costs nothing the other files show: it is
  skipped with a warning (a torn last line, what a kill leaves, silently: that evaluation is made again).

An entry a derived file holds and the journal lacks proves the journal lost it only when it was made before the
checkpoint the run resumes from (``upto``: its global step; ``rows_done``: the matrix rows it records as
evaluated): one made after it may have been cut short by the kill between the two writes, and is made again.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from mtil.errors import UserError
from mtil.evaluation import matrix as mx
from mtil.evaluation.metrics_io import METRIC_COLUMNS, legacy_safe_name, metrics_path, write_metric_rows
from mtil.records.files import MATRIX, RESULTS, SUMMARY, series_name

Cell = tuple[int, str]
Accuracy = tuple[float, float]  # top1, top5, rounded as the CSV files hold them


@dataclass
class Journal:
    """What ``results.jsonl`` holds: matrix cells and each metric series' rows."""

    cells: dict[Cell, Accuracy] = field(default_factory=dict)
    series: dict[str, dict[int, Accuracy]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    damaged_lines: list[int] = field(default_factory=list)  # lines other than the last that are not JSON


def _rounded(top1, top5) -> Accuracy:
    return round(float(top1), 4), round(float(top5), 4) if top5 not in (None, "") else float("nan")


def read_journal(folder: Path) -> Journal:
    """The records of ``folder/results.jsonl``. A line that does not decode is noted in ``damaged_lines`` (unless
    it is the last: a kill mid-append); a decodable line that is no evaluation is skipped (the matrix reader
    warns)."""
    path = folder / RESULTS
    journal = Journal()
    if not path.is_file():
        return journal
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError, UnicodeDecodeError):
            if number < len(lines):
                journal.damaged_lines.append(number)
            continue
        try:
            iteration = int(record["iteration"])
            accuracy = _rounded(record["top1"], record.get("top5"))
            name = series_name(record)
            after_task = None if record.get("after_task") is None else int(record["after_task"])
            if after_task is not None and not 0 <= after_task < 2**63:  # as matrix_from_results: not a matrix cell
                raise ValueError(f"after_task {after_task}")
        except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
            continue
        journal.series.setdefault(name, {})[iteration] = accuracy
        if after_task is not None:
            journal.cells[(after_task, str(record["dataset"]))] = accuracy
            sequence = record.get("sequence")
            sequence = [str(s) for s in sequence] if isinstance(sequence, list) else []
            if len(sequence) >= len(journal.order):
                journal.order = sequence
    return journal


def _csv_rows(path: Path) -> dict[int, Accuracy] | None:
    """A metrics file's rows; None when it cannot be read."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or METRIC_COLUMNS) != METRIC_COLUMNS:
                return None
            return {int(r["iteration"]): _rounded(r["top1"], r["top5"]) for r in reader}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, csv.Error):
        return None


def _matrix_cells(path: Path) -> dict[Cell, Accuracy] | None:
    try:
        long = mx.read_matrix(path)
    except Exception:  # noqa: BLE001 - a file that does not parse is rebuilt from the journal
        return None
    return {(int(r.after_task), str(r.dataset)): _rounded(r.top1, r.top5) for r in long.itertuples()}


def _same(a: Accuracy, b: Accuracy) -> bool:
    return all(x == y or (x != x and y != y) for x, y in zip(a, b))  # NaN equals NaN here


def _lost(results: Path, journal: Journal, what: str, held_by: str) -> UserError:
    damaged = f" (damaged at line {', '.join(map(str, journal.damaged_lines[:3]))})" if journal.damaged_lines else ""
    return UserError(f"{results}{damaged} lacks {what} that {held_by} holds: it lost records and cannot be rebuilt "
                     f"from the other files; restore it, or move the folder away to start over")


@dataclass
class Repairs:
    """The derived files to rebuild from the journal: found by :func:`check_folder` (writes nothing), written by
    :func:`apply_repairs` once the run holds its folder."""

    journal: Journal
    matrix: bool = False
    series: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # to print whether or not anything is rebuilt


def check_folder(folder: Path, upto: int | None = None, rows_done: int | None = None) -> Repairs:
    """Compare every metric file in ``folder`` with the journal; one line when the journal is the damaged one,
    else what to rebuild. ``upto`` / ``rows_done``: see the module docstring (None: every entry counts, as for
    ``--summarize``)."""
    journal = read_journal(folder)
    repairs = Repairs(journal)
    results, matrix_path = folder / RESULTS, folder / MATRIX
    mx.read_summary(folder / SUMMARY)  # damaged: one line now, before anything is written (its rows are not guessed)
    if journal.damaged_lines:
        repairs.warnings.append(f"mtil: warning: {results} line(s) {', '.join(map(str, journal.damaged_lines[:5]))} "
                                f"are not records (skipped; no other metric file holds an evaluation they lost)")
    if matrix_path.is_file():
        cells = _matrix_cells(matrix_path)
        if cells is None:
            repairs.matrix = True
            repairs.notes.append(f"{matrix_path} is damaged")
        else:
            lacking = [c for c in cells if c not in journal.cells and (rows_done is None or c[0] < rows_done)]
            if lacking:
                shown = ", ".join(f"after task {a} {d}" for a, d in lacking[:3])
                raise _lost(results, journal, f"{len(lacking)} evaluation(s) ({shown})", matrix_path.name)
            if any(c not in cells or not _same(v, cells[c]) for c, v in journal.cells.items()):
                repairs.matrix = True
                repairs.notes.append(f"{matrix_path} is short or differs from {RESULTS}")
    elif journal.cells:
        repairs.matrix = True
        repairs.notes.append(f"{matrix_path} is missing")
    known = {metrics_path(folder, name).name for name in journal.series} | \
        {f"metrics_{legacy_safe_name(name)}.csv" for name in journal.series}  # an older mtil's file names
    for path in sorted(folder.glob("metrics_*.csv")):
        held = _csv_rows(path) if path.name not in known else None
        if held and any(upto is None or i < upto for i in held):
            raise _lost(results, journal, f"every evaluation of the {len(held)} row(s)", path.name)
    for name, rows in journal.series.items():
        path = metrics_path(folder, name)
        held = _csv_rows(path) if path.is_file() else {}
        if held is None:
            repairs.series.append(name)
            repairs.notes.append(f"{path} is damaged")
            continue
        extra = [i for i in held if i not in rows and (upto is None or i < upto)]
        if extra:
            raise _lost(results, journal, f"the evaluation(s) of {name} at iteration(s) {', '.join(map(str, extra[:3]))}",
                        path.name)
        if any(i not in held or not _same(v, held[i]) for i, v in rows.items()):
            repairs.series.append(name)
            repairs.notes.append(f"{path} is short or differs from {RESULTS}")
    return repairs


def apply_repairs(folder: Path, repairs: Repairs, order: list[str] | None = None) -> list[str]:
    """Rebuild what :func:`check_folder` found; returns the warnings to print."""
    journal = repairs.journal
    if repairs.matrix:
        long = mx.upsert_rows(mx.empty_matrix(), [{"after_task": a, "dataset": d, "top1": v[0], "top5": v[1]}
                                                  for (a, d), v in journal.cells.items()])
        mx.write_matrix(folder / MATRIX, long, order or journal.order)
    for name in repairs.series:
        write_metric_rows(folder, name, journal.series[name])
    return repairs.warnings + [f"mtil: warning: {note}; rebuilt from {RESULTS}" for note in repairs.notes]
