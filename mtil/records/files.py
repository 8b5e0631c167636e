"""mtil's own files in a run's folder, the first sink of its records (docs/records.md lists them).

* ``results.jsonl``: one line per evaluation (the journal every other metric file can be rebuilt from); its one
  schema is :func:`result_record`'s.
* ``metrics_<Dataset>.csv``: ``iteration,top1,top5`` per evaluation of that dataset.
* ``accuracy_matrix.csv`` (long format), ``summary.csv`` (Transfer / Avg / Last ...) and the heat map
  ``accuracy_matrix.png``.
* ``fewshot.csv`` under the few-shot protocol; ``config.yaml``, the resolved settings.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml

from mtil.atomic import atomic_open
from mtil.errors import UserError
from mtil.evaluation import fewshot_report, matrix as mx
from mtil.evaluation.metrics_io import append_result_line, write_metric_row

RESULTS = "results.jsonl"
MATRIX = "accuracy_matrix.csv"
SUMMARY = "summary.csv"
HEATMAP = "accuracy_matrix.png"
CONFIG = "config.yaml"
RESULT_SCHEMA = 2  # of the results.jsonl record (1: before 2026-12-07, when --eval-only wrote another shape)


def result_record(*, dataset: str, iteration: int, top1: float, top5: float, images: int, classes: int,
                  after_task: int | None = None, sequence: list[str] | None = None, part: str = "all",
                  head: str = "zeroshot", method: str | None = None, variant: str = "",
                  label_space: str = "dataset") -> dict[str, Any]:
    """One evaluation, as every writer of ``results.jsonl`` records it (``time`` and ``config`` are added when it
    is written). ``after_task``: the tasks trained when it ran (None: mid-task, or ``--eval-only``); ``part``:
    the classes it ranked among (``all``, or ``base`` under ``--base-new``); ``variant``: another model than the
    checkpoint's own (``wiseft0.5``), whose rows go to ``metrics_<Dataset>_<variant>.csv``; ``label_space``: the
    classes each image was ranked among (``--label-space``: ``dataset`` or ``seen``)."""
    return {"schema": RESULT_SCHEMA, "dataset": dataset, "iteration": int(iteration), "after_task": after_task,
            "sequence": list(sequence or []), "top1": float(top1), "top5": float(top5), "images": int(images),
            "classes": int(classes), "part": part, "head": head, "method": method, "variant": variant,
            "label_space": label_space}


def series_name(record: Mapping[str, Any]) -> str:
    """The metric file a record belongs to: its dataset, with ``_<variant>`` for a blended model's rows."""
    variant = record.get("variant") or ""
    return f"{record['dataset']}_{variant}" if variant else str(record["dataset"])


class FileRecords:
    """Writes the run's metric files into ``folder`` (rank 0 only; the owner holds none on other ranks)."""

    def __init__(self, folder: Path, config_record: Mapping[str, Any]):
        self.folder = Path(folder)
        self.config_record = dict(config_record)

    def evaluation(self, record: Mapping[str, Any]) -> None:
        write_metric_row(self.folder, series_name(record), record["iteration"], record["top1"], record["top5"])
        append_result_line(self.folder, record, self.config_record)

    def fewshot(self, after_task: int, rows: list[dict]) -> None:
        fewshot_report.write_rows(self.folder, after_task, rows)

    def matrix_cells(self, rows: list[dict], sequence: list[str]) -> None:
        path = self.folder / MATRIX
        long = read_or_rebuild_matrix(path) if path.is_file() else mx.empty_matrix()
        mx.write_matrix(path, mx.upsert_rows(long, rows), sequence)

    def matrix(self) -> pd.DataFrame | None:
        path = self.folder / MATRIX
        return read_or_rebuild_matrix(path) if path.is_file() else None

    def config(self, record: dict, applied: dict[str, dict], typed: set[str], derived: tuple[str, ...],
               task_keys: tuple[str, ...]) -> None:
        write_config_file(self.folder / CONFIG, record, applied, typed, derived, task_keys)


def read_or_rebuild_matrix(path: Path) -> pd.DataFrame:
    """``accuracy_matrix.csv``, or when it is damaged the matrix rebuilt from the ``results.jsonl`` beside it
    (which holds every evaluation), saying so; a one-line error when neither can be read."""
    try:
        return mx.read_matrix(path)
    except (UnicodeDecodeError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        results = path.parent / RESULTS
        long = mx.matrix_from_results(results)[0] if results.is_file() else mx.empty_matrix()
        if long.empty:
            raise UserError(f"{path} is damaged ({type(exc).__name__}) and {results} holds no evaluations to rebuild "
                            f"it from; move it away (the evaluations that follow write a new one)") from None
        print(f"mtil: warning: {path} is damaged ({type(exc).__name__}); rebuilt from {results.name}", file=sys.stderr)
        return long


def write_config_file(path: Path, record: dict, applied: dict[str, dict], typed: set[str],
                      derived: tuple[str, ...] = (), task_keys: tuple[str, ...] = ()) -> None:
    """``<save>/config.yaml``: the resolved settings, such that ``--config`` of this file repeats the run, and as
    comments what each task trained with. Per-task settings (``task_keys``) the command did not type stay
    comments: typed, they would replace a named order's per-task values."""
    settings = {k: v for k, v in record.items() if k != "config" and k not in derived}
    kept = {k: v for k, v in settings.items() if k not in task_keys or k in typed}
    lines = ["# mtil: the resolved settings of this run; `python -m mtil.main --config config.yaml` repeats it.",
             "# Per-task settings applied:"]
    lines += [f"#   {task}: " + ", ".join(f"{k} {v}" for k, v in values.items()) for task, values in applied.items()]
    lines += ["# Not typed, so a named order's per-task values apply over them (defaults otherwise):"]
    lines += [f"#   {k}: {v}" for k, v in settings.items() if k not in kept]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(kept, sort_keys=False, default_flow_style=None)
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_reports(save_dir: Path, method: str, long: pd.DataFrame, order: list[str],
                  log: logging.Logger | None = None) -> dict:
    """Print the matrix and its metrics; write summary.csv and the heat map beside the matrix. Returns the
    summary row."""
    print(mx.format_matrix(long, order))
    complete = True
    try:
        metrics = mx.summarize(long, order)
    except ValueError:
        metrics, complete = mx.summarize(long, order, partial=True), False
    row = {"method": method, **metrics}
    mx.write_summary(save_dir / SUMMARY, [row])
    mx.plot_heatmap(long, order, save_dir / HEATMAP, title=method)
    text = mx.format_summary([row]) + ("" if complete else "\n(partial: some cells of the matrix are missing)")
    print(text)
    if log is not None:
        log.info("summary %s", {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return row
