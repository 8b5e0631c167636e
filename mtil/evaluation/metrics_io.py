"""Metric files: ``metrics_<Dataset>.csv`` (iteration,top1,top5) and ``results.jsonl`` (one line per evaluation)."""
from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from typing import Any, Mapping

from mtil.atomic import atomic_open

METRIC_COLUMNS = ("iteration", "top1", "top5")


def safe_name(dataset: str) -> str:
    """A file-name-safe form of a dataset name (``ImageFolder:/x/y`` -> ``ImageFolder_x_y``)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", dataset).strip("_")


def metrics_path(save_dir: str | Path, dataset: str) -> Path:
    return Path(save_dir) / f"metrics_{safe_name(dataset)}.csv"


def read_metrics(path: str | Path) -> dict[int, tuple[float, float]]:
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {int(row["iteration"]): (float(row["top1"]), float(row["top5"])) for row in csv.DictReader(handle)}


def write_metric_row(save_dir: str | Path, dataset: str, iteration: int, top1: float, top5: float) -> Path:
    """Add (or replace) the row for ``iteration``: a re-run evaluation never duplicates a row."""
    path = metrics_path(save_dir, dataset)
    rows = read_metrics(path)
    rows[int(iteration)] = (float(top1), float(top5))
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
    with path.open("a") as handle:
        handle.write(line + "\n")
    return path
