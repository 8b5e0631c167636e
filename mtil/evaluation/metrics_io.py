"""Metric files: ``metrics_<Dataset>.csv`` (iteration,top1,top5) and ``results.jsonl`` (one line per evaluation)."""
from __future__ import annotations

import csv
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from mtil.atomic import atomic_open
from mtil.errors import no_space_cause, no_space_error

METRIC_COLUMNS = ("iteration", "top1", "top5")


FILE_DATASETS = ("ImageFolder:", "CSV:")  # datasets named by a path


def short_name(dataset: str) -> str:
    """What tables, plots, progress lines and file names call a dataset: an image folder by its folder's name, a
    CSV set by its file's stem (``ImageFolder:/data/sets/har_dataset`` -> ``har_dataset``); a registry name as it
    is. The full name stays in results.jsonl and accuracy_matrix.csv, where it says which data was read; a run
    refuses two datasets of one short name (:func:`short_name_clashes`)."""
    for prefix in FILE_DATASETS:
        if dataset.startswith(prefix):
            base = dataset[len(prefix):].rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
            if prefix == "CSV:" and base.lower().endswith(".csv"):
                base = base[:-4]
            return base or dataset
    return dataset


def short_name_clashes(datasets: list[str]) -> list[tuple[str, str]]:
    """Pairs of different datasets of a run whose files would share a name (their short names agree)."""
    seen: dict[str, str] = {}
    clashes = []
    for name in dict.fromkeys(datasets):
        key = safe_name(name).lower()
        if key in seen and seen[key] != name:
            clashes.append((seen[key], name))
        seen.setdefault(key, name)
    return clashes


def legacy_safe_name(dataset: str) -> str:
    """The file-name form of a dataset before short names (2026-12-07): the whole name (``ImageFolder_x_y``). A
    folder of an older run may hold files named so; they are known, not foreign."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", dataset).strip("_")


RESERVED_STEMS = ("latest", "latest.prev")  # the run's own checkpoints: no dataset's files may take their names


def safe_name(dataset: str) -> str:
    """A file-name-safe form of a dataset's short name (``ImageFolder:/x/har data`` -> ``har_data``). A short name
    that would be empty (non-ASCII letters only), hidden (``.x``) or one of the run's own files (``latest``) falls
    back to the whole name's form, which cannot be any of these."""
    name = re.sub(r"[^A-Za-z0-9.+-]+", "_", short_name(dataset)).strip("_")
    if not name or name.startswith(".") or name.lower() in RESERVED_STEMS:
        return legacy_safe_name(dataset)
    return name


def task_checkpoint_path(folder: str | Path, dataset: str) -> Path:
    """``<folder>/<short name>.pth``, or the whole-name file an older run wrote there when only that one exists."""
    path = Path(folder) / f"{safe_name(dataset)}.pth"
    legacy = Path(folder) / f"{legacy_safe_name(dataset)}.pth"
    return legacy if not path.is_file() and legacy.is_file() else path


def metrics_path(save_dir: str | Path, dataset: str) -> Path:
    return Path(save_dir) / f"metrics_{safe_name(dataset)}.csv"


def read_metrics(path: str | Path) -> dict[int, tuple[float, float]]:
    """The rows of a metrics file; a damaged one (undecodable, a bad row) is rebuilt from the ``results.jsonl``
    beside it, which holds every evaluation, with a warning on stderr."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return {int(row["iteration"]): (float(row["top1"]), float(row["top5"]))
                    for row in csv.DictReader(handle)}
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, csv.Error) as exc:
        dataset = path.stem.removeprefix("metrics_")
        rows = metrics_from_results(path.parent / "results.jsonl", dataset)
        print(f"mtil: warning: {path} is damaged ({type(exc).__name__}); rebuilt {len(rows)} row(s) from "
              f"results.jsonl", file=sys.stderr)
        return rows


def read_result_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``results.jsonl``; undecodable bytes and torn or foreign lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # torn, foreign, 5000 digits, thousands of nested brackets
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def metrics_from_results(results: str | Path, dataset: str) -> dict[int, tuple[float, float]]:
    rows = {}
    for record in read_result_records(results):
        try:
            if safe_name(str(record["dataset"])) == dataset:
                rows[int(record["iteration"])] = (float(record["top1"]), float(record["top5"]))
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: an iteration of 1e400
            continue
    return rows


def write_metric_row(save_dir: str | Path, dataset: str, iteration: int, top1: float, top5: float) -> Path:
    """Add (or replace) the row for ``iteration``: a re-run evaluation never duplicates a row."""
    rows = read_metrics(metrics_path(save_dir, dataset))
    rows[int(iteration)] = (float(top1), float(top5))
    return write_metric_rows(save_dir, dataset, rows)


def write_metric_rows(save_dir: str | Path, dataset: str, rows: Mapping[int, tuple[float, float]]) -> Path:
    """Write a metrics file holding exactly ``rows`` (iteration -> (top1, top5))."""
    path = metrics_path(save_dir, dataset)
    with atomic_open(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(METRIC_COLUMNS)
        for it in sorted(rows):
            writer.writerow([it, f"{rows[it][0]:.4f}", f"{rows[it][1]:.4f}"])
    return path


def append_result_line(save_dir: str | Path, record: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """One JSON line per evaluation with the run's resolved configuration (wise-ft's habit)."""
    path = Path(save_dir) / "results.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record, "config": dict(config)},
                      default=str, sort_keys=False)
    try:
        with path.open("a+b") as handle:
            handle.seek(0, 2)
            if handle.tell() > 0:
                handle.seek(-1, 2)
                if handle.read(1) != b"\n":  # a torn last line (a crash or full disk mid-write): end it, so the
                    handle.write(b"\n")       # new record does not continue it and get lost with it
            handle.write((line + "\n").encode("utf-8"))
    except OSError as exc:
        cause = no_space_cause(exc)
        if cause is not None:  # at worst a torn last line, which the next append ends and the readers skip
            raise no_space_error(path, cause) from None
        raise
    return path
