"""The MTIL accuracy matrix ``A[i][j]`` and its metrics (ZSCL paper definitions).

A run trains on datasets ``D_1..D_n`` in order. After each task ``i`` (and once before any
training: row 0, zero-shot) the model is evaluated on every dataset, giving ``A[i][j]``
(top-1 %, ``i`` = number of tasks trained so far, ``0..n``; ``j`` = dataset index ``1..n`` in
training order). Metrics (``n`` = number of training tasks):

- ``transfer``   = mean over j=2..n of (mean over i=1..j-1 of A[i][j])  (before training on D_j,
  row 0 excluded)
- ``avg``        = mean of A[i][j] over i=1..n, j=1..n
- ``last``       = mean over j of A[n][j]
- ``forgetting`` = mean over j=1..n-1 of (max over i=j..n-1 of A[i][j] - A[n][j])
- ``bwt``        = mean over j=1..n-1 of (A[n][j] - A[j][j])
- ``zero_shot``  = mean over j of A[0][j]  (NaN when row 0 is absent)

When ``n == 1`` transfer, forgetting and bwt are undefined and are NaN (written as empty
cells in CSV files). Datasets evaluated but not in the training order ("extras") appear in the
matrix, tables and plots, but never in the metrics.

Storage is long format (:data:`MATRIX_COLUMNS`): one row per ``(after_task, dataset)`` cell.
A cell whose ``top1`` is NaN counts as missing.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mtil.atomic import atomic_open
from mtil.errors import UserError
from mtil.evaluation.metrics_io import short_name

MATRIX_COLUMNS = ("after_task", "dataset", "top1", "top5")
SUMMARY_METRICS = ("transfer", "avg", "last", "forgetting", "bwt", "zero_shot")
SUMMARY_COLUMNS = ("method",) + SUMMARY_METRICS

_MAX_LISTED_MISSING = 30


# --------------------------------------------------------------------------- long format helpers


def empty_matrix() -> pd.DataFrame:
    """An empty long-format matrix with the right columns and dtypes."""
    return _normalize(pd.DataFrame(columns=list(MATRIX_COLUMNS)))


def _normalize(long: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Copy ``long`` with exactly :data:`MATRIX_COLUMNS` and proper dtypes (top5 may be absent)."""
    df = long.copy() if isinstance(long, pd.DataFrame) else pd.DataFrame(list(long))
    for col in ("after_task", "dataset", "top1"):
        if col not in df.columns:
            if len(df) == 0:
                df[col] = pd.Series(dtype=object)
            else:
                raise ValueError(f"matrix is missing column {col!r} (has {list(df.columns)})")
    if "top5" not in df.columns:
        df["top5"] = np.nan
    df = df[list(MATRIX_COLUMNS)].reset_index(drop=True)
    if df["after_task"].isna().any():
        raise ValueError("matrix has rows with an empty after_task")
    try:
        df["after_task"] = df["after_task"].astype("int64")
    except (OverflowError, TypeError) as exc:  # 99999999999999999999, or not a number at all
        raise ValueError(f"matrix has an after_task that is not a task number ({exc})") from None
    df["dataset"] = df["dataset"].astype(str)
    df["top1"] = pd.to_numeric(df["top1"], errors="coerce").astype("float64")
    df["top5"] = pd.to_numeric(df["top5"], errors="coerce").astype("float64")
    if (df["after_task"] < 0).any():
        raise ValueError("after_task must be >= 0")
    return df


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the last row for each ``(after_task, dataset)`` cell."""
    return df.drop_duplicates(subset=["after_task", "dataset"], keep="last").reset_index(drop=True)


def _dataset_columns(df: pd.DataFrame, order: Sequence[str]) -> list[str]:
    """``order`` followed by the extra datasets, in order of first appearance."""
    order = list(order)
    known = set(order)
    extras = [d for d in dict.fromkeys(df["dataset"]) if d not in known]
    return order + extras


def _sorted(df: pd.DataFrame, order: Sequence[str] | None) -> pd.DataFrame:
    """Sort by after_task, then dataset position (``order`` then extras by first appearance)."""
    cols = _dataset_columns(df, order or [])
    rank = {d: k for k, d in enumerate(cols)}
    key = df["dataset"].map(rank)
    out = df.assign(_rank=key).sort_values(["after_task", "_rank"], kind="stable")
    return out.drop(columns="_rank").reset_index(drop=True)


def to_wide(long: pd.DataFrame, order: list[str], value: str = "top1") -> pd.DataFrame:
    """Pivot to rows ``after_task`` (ascending), columns the datasets in ``order`` then extras.

    Datasets in ``order`` with no cell at all still get a (NaN) column; duplicated cells keep
    the last occurrence.
    """
    if value not in ("top1", "top5"):
        raise ValueError(f"value must be 'top1' or 'top5', not {value!r}")
    df = _dedupe(_normalize(long))
    cols = _dataset_columns(df, order)
    rows = sorted(int(i) for i in df["after_task"].unique())
    wide = df.pivot(index="after_task", columns="dataset", values=value) if len(df) else pd.DataFrame()
    wide = wide.reindex(index=rows, columns=cols).astype("float64")
    wide.index.name = "after_task"
    wide.columns.name = None
    return wide


def upsert_rows(long: pd.DataFrame, rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Return ``long`` plus ``rows``; a row replaces any cell with the same (after_task, dataset)."""
    old = _normalize(long)
    new = _dedupe(_normalize(rows))
    if len(new) == 0:
        return _dedupe(old)
    if len(old) == 0:
        return new
    keys = set(zip(new["after_task"], new["dataset"]))
    keep = [(a, d) not in keys for a, d in zip(old["after_task"], old["dataset"])]
    return _dedupe(pd.concat([old[keep], new], ignore_index=True))


# --------------------------------------------------------------------------- metrics


def _nanmean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values if not _isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _missing_message(missing: list[tuple[int, str]]) -> str:
    listed = ", ".join(f"({i}, {d!r})" for i, d in missing[:_MAX_LISTED_MISSING])
    more = f", ... and {len(missing) - _MAX_LISTED_MISSING} more" if len(missing) > _MAX_LISTED_MISSING else ""
    return (f"accuracy matrix incomplete: missing {len(missing)} (after_task, dataset) cell(s): "
            f"{listed}{more} (use partial=True for metrics over the cells that exist)")


def summarize(long: pd.DataFrame, order: list[str], partial: bool = False) -> dict[str, float]:
    """Transfer/Avg/Last/Forgetting/BWT/zero-shot (top-1 %) of a run trained on ``order``.

    Full mode (default) needs every cell ``A[i][j]`` for i=1..n, j=1..n (and all of row 0 if
    any of row 0 exists); otherwise ``ValueError`` names the missing cells. Rows with
    ``after_task > n`` are an error. Extra datasets are ignored. NaN for undefined metrics
    (transfer/forgetting/bwt when n == 1; zero_shot without row 0).

    ``partial=True`` (a run still in progress, latest trained row ``k`` = largest
    ``after_task >= 1`` present): ``last`` = mean of the available cells of row ``k``;
    ``transfer``, ``avg`` and ``zero_shot`` = the formulas over the cells that exist (a dataset
    with no usable cell is skipped); ``forgetting``/``bwt`` are "so far", with row ``k``
    standing in for row ``n`` (j=1..k-1). Anything with no cells to average is NaN.
    """
    order = list(order)
    n = len(order)
    if n == 0:
        raise ValueError("order (the training sequence) is empty")
    if len(set(order)) != n:
        raise ValueError(f"order has repeated datasets: {order}")
    wide = to_wide(long, order)
    too_far = [int(i) for i in wide.index if i > n]
    if too_far:
        raise ValueError(f"matrix has rows after_task={too_far} beyond the {n} tasks in order {order}")

    def cell(i: int, j: int) -> float:
        """A[i][j] with 1-based j; NaN when absent."""
        if i not in wide.index:
            return math.nan
        return float(wide.at[i, order[j - 1]])

    if not partial:
        missing = [(i, order[j - 1]) for i in range(1, n + 1) for j in range(1, n + 1) if _isnan(cell(i, j))]
        row0 = [cell(0, j) for j in range(1, n + 1)]
        if not all(_isnan(v) for v in row0):
            missing = [(0, order[j - 1]) for j in range(1, n + 1) if _isnan(row0[j - 1])] + missing
        if missing:
            raise ValueError(_missing_message(missing))
        last_row = n
    else:
        trained = [int(i) for i in wide.index if i >= 1 and not wide.loc[i, order].isna().all()]
        last_row = max(trained) if trained else 0

    transfer = _nanmean(_nanmean(cell(i, j) for i in range(1, j)) for j in range(2, n + 1))
    avg = _nanmean(cell(i, j) for i in range(1, n + 1) for j in range(1, n + 1))
    zero_shot = _nanmean(cell(0, j) for j in range(1, n + 1))

    def _forgetting_of(j: int) -> float:
        """max over i=j..last_row-1 of A[i][j], minus A[last_row][j]."""
        before = [v for v in (cell(i, j) for i in range(j, last_row)) if not _isnan(v)]
        return max(before) - cell(last_row, j) if before else math.nan

    if last_row == 0:
        last = forgetting = bwt = math.nan
    else:
        last = _nanmean(cell(last_row, j) for j in range(1, n + 1))
        forgetting = _nanmean(_forgetting_of(j) for j in range(1, last_row))
        bwt = _nanmean(cell(last_row, j) - cell(j, j) for j in range(1, last_row))
    return {"transfer": transfer, "avg": avg, "last": last, "forgetting": forgetting, "bwt": bwt,
            "zero_shot": zero_shot}


# --------------------------------------------------------------------------- CSV files


def _fmt(v: Any, digits: int = 4) -> str:
    """A float for CSV: fixed decimals, empty for NaN/None."""
    if _isnan(v):
        return ""
    return f"{float(v):.{digits}f}"


def write_matrix(path: str | os.PathLike, long: pd.DataFrame, order: list[str] | None = None) -> Path:
    """Write the long matrix atomically, sorted by after_task then dataset order.

    Dataset order is ``order`` (if given) then the remaining datasets by first appearance.
    Duplicated cells keep the last occurrence; NaN values are written as empty cells.
    """
    df = _sorted(_dedupe(_normalize(long)), order)
    path = Path(path)
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MATRIX_COLUMNS)
        for row in df.itertuples(index=False):
            writer.writerow([int(row.after_task), row.dataset, _fmt(row.top1), _fmt(row.top5)])
    return path


def read_matrix(path: str | os.PathLike) -> pd.DataFrame:
    """Read a file written by :func:`write_matrix` (empty cells become NaN)."""
    df = pd.read_csv(path, dtype={"dataset": str, "top1": str, "top5": str},
                     keep_default_na=False, na_values={"top1": [""], "top5": [""]})
    return _normalize(df)


def read_summary(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``summary.csv`` as dicts (``method`` str, metrics float, NaN for empty); [] if absent."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                rec: dict[str, Any] = {"method": row.get("method", "")}
                for key in SUMMARY_METRICS:
                    text = (row.get(key) or "").strip()
                    rec[key] = float(text) if text else math.nan
                out.append(rec)
    except (UnicodeDecodeError, ValueError, csv.Error) as exc:  # its rows are kept (one per method): never guessed
        raise UserError(f"{path} is damaged ({type(exc).__name__}: it holds rows that are no summary); move it away, "
                        f"and the next --summarize (or the end of the run) writes it again") from None
    return out


def write_summary(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Create/update ``summary.csv`` atomically: one row per method, same method replaced in place.

    Each row needs ``method``; missing metrics and NaN are written as empty cells, other keys
    are ignored. New methods are appended in the order given.
    """
    merged: dict[str, dict[str, Any]] = {r["method"]: r for r in read_summary(path)}
    for row in rows:
        if "method" not in row or row["method"] in (None, ""):
            raise ValueError(f"summary row without a method name: {row}")
        merged[str(row["method"])] = {"method": str(row["method"]), **{k: row.get(k) for k in SUMMARY_METRICS}}
    path = Path(path)
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(SUMMARY_COLUMNS)
        for method, rec in merged.items():
            writer.writerow([method] + [_fmt(rec.get(k)) for k in SUMMARY_METRICS])
    return path


# --------------------------------------------------------------------------- display


def _row_label(i: int, order: Sequence[str]) -> str:
    if i == 0:
        return "zero-shot"
    return f"after {i}: {short_name(order[i - 1])}" if i <= len(order) else f"after {i}"


def format_matrix(long: pd.DataFrame, order: list[str]) -> str:
    """A text table of top-1: rows "zero-shot", "after i: <dataset>"; 1 decimal, '-' if missing."""
    wide = to_wide(long, order)
    labels = [_row_label(int(i), order) for i in wide.index]
    header = [""] + [short_name(c) for c in wide.columns]
    body = [[lab] + ["-" if _isnan(v) else f"{v:.1f}" for v in wide.loc[i].tolist()]
            for lab, i in zip(labels, wide.index)]
    widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]
    lines = ["  ".join(h.ljust(w) if c == 0 else h.rjust(w) for c, (h, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    return "\n".join(line.rstrip() for line in lines)


def format_summary(rows: list[dict]) -> str:
    """A text table of summary rows (method + metrics, 2 decimals, '-' for NaN/missing)."""
    header = list(SUMMARY_COLUMNS)
    body = [[str(r.get("method", ""))] + ["-" if _isnan(r.get(k)) else f"{float(r[k]):.2f}" for k in SUMMARY_METRICS]
            for r in rows]
    widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]
    lines = ["  ".join(h.ljust(w) if c == 0 else h.rjust(w) for c, (h, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    return "\n".join(line.rstrip() for line in lines)


def plot_heatmap(long: pd.DataFrame, order: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Save a PNG heat map of top-1 with the values printed in the cells (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    wide = to_wide(long, order)
    values = wide.to_numpy(dtype=float)
    rows, cols = values.shape
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * cols), max(2.5, 1.0 + 0.45 * rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(values) if values.size else np.zeros((max(rows, 1), max(cols, 1)))
    im = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    for r in range(rows):
        for c in range(cols):
            v = values[r, c]
            if not math.isnan(v):
                ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 60 else "white")
    ax.set_xticks(range(cols))
    ax.set_xticklabels([short_name(c) for c in wide.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(rows))
    ax.set_yticklabels([_row_label(int(i), order) for i in wide.index], fontsize=8)
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    return path


# --------------------------------------------------------------------------- results.jsonl


def matrix_from_results(results_jsonl_path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """Build the long matrix and training order from a ``results.jsonl``.

    Lines with a non-null ``after_task`` are cells (``dataset``, ``top1``, ``top5``,
    ``after_task``, ``sequence``); a later line for the same cell replaces an earlier one; lines
    without ``after_task`` (mid-task evaluations) are ignored. The order is the longest
    ``sequence`` seen (the latest one on ties). Undecodable lines (e.g. a torn last line after a
    crash) and sequences that are not a prefix of the order are warned about.
    """
    cells: dict[tuple[int, str], dict[str, Any]] = {}
    sequences: list[list[str]] = []
    order: list[str] = []
    with Path(results_jsonl_path).open(encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # torn or foreign, 5000 digits, thousands of nested brackets
                warnings.warn(f"{results_jsonl_path}:{lineno}: skipping undecodable line")
                continue
            if not isinstance(rec, dict) or rec.get("after_task") is None:
                continue
            try:
                key = (int(rec["after_task"]), str(rec["dataset"]))
                seq = [str(s) for s in (rec.get("sequence") or [])]
                if not 0 <= key[0] < 2**63:
                    raise ValueError(f"after_task {key[0]}")
            except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: an after_task of 1e400
                warnings.warn(f"{results_jsonl_path}:{lineno}: skipping a record without a valid after_task/dataset")
                continue
            sequences.append(seq)
            if len(seq) >= len(order):
                order = seq
            cells.pop(key, None)  # re-insert so the replacement takes the later position
            cells[key] = {"after_task": key[0], "dataset": key[1], "top1": rec.get("top1"),
                          "top5": rec.get("top5")}
    bad = [s for s in sequences if s != order[:len(s)]]
    if bad:
        warnings.warn(f"{results_jsonl_path}: sequences {bad[:3]} are not prefixes of the order {order}; "
                      "does the file mix several runs?")
    long = _normalize(list(cells.values())) if cells else empty_matrix()
    return _sorted(long, order), order
