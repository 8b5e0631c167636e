"""The tables of a sweep (or of ``--seeds``): one row per point and dataset, the mean ± std over seeds, and the
setting chosen on validation accuracy.

``results.csv``: the point's columns (its grid values and seed), ``point`` (its folder), ``dataset``, ``val``,
``test``, ``base``, ``new``, ``hm`` (what the run's last evaluation measured; see
:func:`mtil.evaluation.fewshot_report.final_results`) and ``status``. ``summary.csv`` / ``summary.md``: grouped by
every column but the seeds, each measure's mean and sample std and the number of seeds ``n`` (``hm`` is the
harmonic mean of the mean base and new accuracies, as CoCoOp's tables give it; its std is that of the seeds' own
HMs). ``selected.csv``: per value of the ``--select-per`` columns and dataset, the group with the best mean
validation accuracy, with its test accuracy reported beside it (never used to choose).
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from mtil.atomic import atomic_open
from mtil.datasets.fewshot import harmonic_mean
from mtil.evaluation.fewshot_report import RESULT_COLUMNS, final_results
from mtil.evaluation.selection import best

MEASURES = RESULT_COLUMNS[1:]  # val, test, base, new, hm


def collect(points: list[tuple[dict[str, str], str, Path, str]]) -> list[dict[str, Any]]:
    """Rows from ``(columns, name, folder, status)`` per point: one per dataset the point's run measured (one
    row without a dataset for a point with no results yet)."""
    rows = []
    for columns, name, folder, status in points:
        results = read_results(folder)
        if results is None:
            results, status = [], f"{status}; results unreadable"
        for result in results or [{"dataset": ""}]:
            rows.append({**columns, "point": name, **result, "status": status})
    return rows


def read_results(folder: Path) -> list[dict[str, Any]] | None:
    """A point's final results; None when its files cannot be read (a damaged file must not cost the table)."""
    try:
        return final_results(folder) if folder.is_dir() else []
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


DONE = ("finished", "skipped")  # point statuses whose results are final


def group(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Mean and std of every measure over the rows that agree on ``keys`` (and the dataset), in first-seen
    order; ``n`` counts the seeds (rows) averaged. Rows of unfinished points, or without results, are left out."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("dataset") and row.get("status") in DONE:
            groups.setdefault(tuple(row.get(k) for k in [*keys, "dataset"]), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip([*keys, "dataset"], key))
        for measure in MEASURES:
            values = [float(r[measure]) for r in members if r.get(measure) not in (None, "")]
            if values:
                entry[measure], entry[measure + "_std"] = _mean_std(values)
        if "base" in entry and "new" in entry:  # as CoCoOp's tables: the HM of the mean base and new accuracies
            entry["hm"] = harmonic_mean(entry["base"], entry["new"])
        entry["n"] = len(members)
        out.append(entry)
    return out


def select(summary: list[dict[str, Any]], per: list[str], split: str = "val") -> list[dict[str, Any]]:
    """Per value of the ``per`` columns and dataset, the summary row with the best mean ``split`` accuracy."""
    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for row in summary:
        buckets.setdefault(tuple(row.get(k) for k in [*per, "dataset"]), []).append(row)
    return [chosen for members in buckets.values() if (chosen := best(members, split)) is not None]


def measures_in(rows: list[dict[str, Any]]) -> list[str]:
    return [m for m in MEASURES if any(m in r for r in rows)]


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with atomic_open(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else round(value, 4)
    return "" if value is None else value


def summary_columns(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    measures = measures_in(rows)
    return [*keys, "dataset", *[c for m in measures for c in (m, m + "_std")], "n"]


def markdown(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """Grouped rows as a markdown table: ``mean ± std`` per measure."""
    measures = measures_in(rows)
    names = {"hm": "HM"}
    lines = ["| " + " | ".join([*keys, "dataset", *[names.get(m, m) for m in measures], "n"]) + " |",
             "|" + " --- |" * (len(keys) + len(measures) + 2)]
    for row in rows:
        cells = [str(row.get(k, "")) for k in [*keys, "dataset"]]
        cells += [("" if m not in row else f"{row[m]:.2f} ± {row[m + '_std']:.2f}" if row["n"] > 1 else
                   f"{row[m]:.2f}") for m in measures]  # one seed has no spread: no "± 0.00"
        lines.append("| " + " | ".join(cells + [str(row["n"])]) + " |")
    return "\n".join(lines)


def write_tables(folder: Path, rows: list[dict[str, Any]], keys: list[str], seed_keys: list[str],
                 stem: str = "") -> tuple[list[dict[str, Any]], list[Path]]:
    """Write ``<stem>results.csv`` (every row), ``<stem>summary.csv`` and ``<stem>summary.md`` (mean ± std over
    ``seed_keys``, grouped by the other ``keys``); return the summary rows and the files written."""
    by = [k for k in keys if k not in seed_keys]
    summary = group(rows, by)
    files = [folder / f"{stem}results.csv", folder / f"{stem}summary.csv", folder / f"{stem}summary.md"]
    write_csv(files[0], rows, [*keys, "point", "dataset", *measures_in(rows), "status"])
    write_csv(files[1], summary, summary_columns(by, summary))
    with atomic_open(files[2], "w") as handle:
        handle.write(markdown(summary, by) + "\n")
    return summary, files
