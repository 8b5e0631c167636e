"""A few-shot run's evaluations beyond the accuracy matrix: validation accuracy, base and new accuracy, HM.

``<save>/fewshot.csv`` holds one row per (after_task, dataset, split, classes): ``split`` is ``test`` or ``val``
(the validation images drawn from the training split), ``classes`` is ``all``, ``base`` or ``new``. The accuracy
matrix keeps its meaning (one test accuracy per cell: all classes, or with ``--base-new`` the base classes, the
ones trained). :func:`final_results` reads what a finished run ends with, per dataset: the file every table of
seeds and sweeps is built from.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtil.atomic import atomic_open
from mtil.datasets.fewshot import FewShot, harmonic_mean

if TYPE_CHECKING:  # only for type hints: the sweep's tables read these files without loading torch's models
    from mtil.evaluation.zeroshot import EvalResult, ZeroShotEvaluator

FEWSHOT_FILE = "fewshot.csv"
FEWSHOT_COLUMNS = ("after_task", "dataset", "split", "classes", "top1", "top5", "images")
RESULT_COLUMNS = ("dataset", "val", "test", "base", "new", "hm")  # what final_results gives per dataset


def matrix_part(protocol: FewShot | None) -> str:
    """The classes an accuracy-matrix cell is measured on: the base classes under ``--base-new``, else all."""
    return "base" if protocol is not None and protocol.base_new else "all"


def _row(split: str, part: str, result: EvalResult) -> dict[str, Any]:
    return {"dataset": result.dataset, "split": split, "classes": part, "top1": result.top1, "top5": result.top5,
            "images": result.count}


def evaluate_extra(evaluator: ZeroShotEvaluator, protocol: FewShot, name: str, main: EvalResult,
                   with_val: bool, seen: list[str] | None = None) -> list[dict[str, Any]]:
    """The few-shot rows of dataset ``name``: its matrix cell (``main``), the new classes' test accuracy under
    ``--base-new``, and with ``with_val`` (a dataset the run trains, under ``--shots``) the validation accuracy.
    ``seen``: the tasks trained so far under ``--label-space seen`` (the validation images are then ranked in the
    same label space as the matrix cell; --base-new is refused with it)."""
    rows = [_row("test", matrix_part(protocol), main)]
    if protocol.base_new:
        rows.append(_row("test", "new", evaluator.evaluate(name, "test", "new")))
    if with_val and protocol.shots is not None:
        val = evaluator.evaluate(name, "val", protocol.training_part) if seen is None else \
            evaluator.evaluate(name, "val", protocol.training_part, seen=seen)
        rows.append(_row("val", protocol.training_part, val))
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [{**row, "after_task": int(row["after_task"]), "top1": float(row["top1"])}
                for row in csv.DictReader(handle)]


def write_rows(save_dir: Path, after_task: int, rows: list[dict[str, Any]]) -> None:
    """Add (or, re-evaluated after a resume, replace) the rows of one evaluation in ``fewshot.csv``."""
    path = Path(save_dir) / FEWSHOT_FILE
    key = lambda r: (int(r["after_task"]), r["dataset"], r["split"], r["classes"])  # noqa: E731
    table = {key(r): r for r in read_rows(path)}
    for row in rows:
        row = {**row, "after_task": after_task}
        table[key(row)] = row
    with atomic_open(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(FEWSHOT_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in sorted(table.values(), key=lambda r: (int(r["after_task"]),)):
            writer.writerow(row)


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """dataset -> {val, test, base, new, hm} (the keys it has) from one evaluation's rows."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        entry = out.setdefault(row["dataset"], {})
        if row["split"] == "val":
            entry["val"] = float(row["top1"])
        else:
            entry["test" if row["classes"] == "all" else row["classes"]] = float(row["top1"])
    for entry in out.values():
        if "base" in entry and "new" in entry:
            entry["hm"] = harmonic_mean(entry["base"], entry["new"])
    return out


def format_line(label: str, rows: list[dict[str, Any]]) -> str:
    """``[after task 1, few-shot] ToyColorB val 80.00 base 85.00 new 60.00 HM 70.33``."""
    parts = []
    for dataset, entry in summarize_rows(rows).items():
        shown = "  ".join(f"{k if k != 'hm' else 'HM'} {entry[k]:.2f}" for k in RESULT_COLUMNS[1:] if k in entry)
        parts.append(f"{dataset}: {shown}")
    return f"[{label}, few-shot] " + ";  ".join(parts)


def final_results(save_dir: str | Path) -> list[dict[str, Any]]:
    """Per dataset, what the run's last evaluation measured: ``val``, ``test`` (all classes), ``base``, ``new``,
    ``hm`` (absent keys: not measured). From ``fewshot.csv``; for a run without the few-shot protocol, the test
    accuracies of the last row of ``accuracy_matrix.csv``. Empty when the run has evaluated nothing yet."""
    save_dir = Path(save_dir)
    rows = read_rows(save_dir / FEWSHOT_FILE)
    if not rows:
        matrix = save_dir / "accuracy_matrix.csv"
        if not matrix.is_file():
            return []
        from mtil.evaluation.matrix import read_matrix

        long = read_matrix(matrix)
        long = long[long["top1"].notna()]
        if long.empty:
            return []
        last = long[long["after_task"] == long["after_task"].max()]
        return [{"dataset": str(r.dataset), "test": float(r.top1)} for r in last.itertuples()]
    last = max(int(r["after_task"]) for r in rows)
    summary = summarize_rows([r for r in rows if int(r["after_task"]) == last])
    return [{"dataset": dataset, **entry} for dataset, entry in summary.items()]


def format_table(results: list[dict[str, Any]]) -> str:
    """The final results as a markdown table (only the columns some dataset has)."""
    columns = [c for c in RESULT_COLUMNS[1:] if any(c in r for r in results)]
    lines = ["| dataset | " + " | ".join("HM" if c == "hm" else c for c in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for r in results:
        cells = [f"{r[c]:.2f}" if c in r and not math.isnan(r[c]) else "" for c in columns]
        lines.append(f"| {r['dataset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
