"""Classification reports of one evaluation: top-k, precision / recall / F1, the confusion matrix, and their files.

Everything is computed from the evaluator's logits (N x C) and labels (N), so a report describes exactly the
evaluation whose top-1 the accuracy matrix holds. Every metric is in percent (0-100), as mtil's top-1 / top-5.

Definitions (per class ``c``; ``TP_c`` images of ``c`` predicted ``c``, ``support_c`` images of ``c``,
``predicted_c`` images predicted ``c``):

* precision_c = TP_c / predicted_c, and **0 for a class never predicted** (predicted_c = 0);
* recall_c = TP_c / support_c, and 0 for a class with no image among those evaluated (only a sampled
  ``--max-evaluation-size`` can leave one out);
* F1_c = 2 P R / (P + R), and 0 when P + R = 0;
* **macro** = the plain mean over the classes with at least one image evaluated (support > 0): a class that was
  not in the sample has no recall to average; **weighted** = the mean weighted by support (so weighted recall is
  top-1 accuracy).

The prediction of an image is the first of ``torch.topk`` of its logits, the same call the evaluator makes, so a
report's top-1 is the evaluator's to the last bit, ties included.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mtil.atomic import atomic_open

TOP_KS = (1, 3, 5)
AVERAGED = ("precision", "recall", "f1")
CONFUSION_FILE = "confusion_matrix.csv"
PER_CLASS_FILE = "per_class.csv"
SUMMARY_FILE = "summary.json"
HEATMAP_FILE = "confusion_matrix.png"
COMPARISON_FILE = "baseline_vs_final.png"
PER_CLASS_COLUMNS = ("class", "support", "precision", "recall", "f1")
CORNER = "true \\ predicted"  # the confusion CSV's top-left cell
CELL_NUMBERS_UP_TO = 20  # classes up to which the heat map prints each cell's count
TICK_LABELS_UP_TO = 100  # classes up to which the heat map names every row and column


# ------------------------------------------------------------------------------------------------- computation
def _as_tensor(values: Any) -> torch.Tensor:
    return values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def ranked(logits: Any, k: int) -> torch.Tensor:
    """The ``k`` best classes of each image, best first (N x k), by ``torch.topk`` as the evaluator ranks."""
    logits = _as_tensor(logits)
    return logits.topk(k, dim=1).indices


def top_k_accuracy(logits: Any, labels: Any, ks: Sequence[int] = TOP_KS) -> dict[int, float]:
    """k -> % of images whose label is among the k best classes; k is capped at the number of classes (top-5 of a
    3-class task is its top-3, 100 %)."""
    logits, labels = _as_tensor(logits), _as_tensor(labels).long()
    _check_shapes(logits, labels)
    classes = logits.shape[1]
    best = ranked(logits, min(max(ks), classes))
    hits = best == labels[:, None]
    total = labels.numel()
    return {k: 100.0 * hits[:, :min(k, classes)].any(dim=1).sum().item() / total for k in ks}


def confusion_matrix(predictions: Any, labels: Any, classes: int) -> np.ndarray:
    """C x C counts: row = true class, column = predicted class."""
    predictions = np.asarray(_as_tensor(predictions), dtype=np.int64).ravel()
    labels = np.asarray(_as_tensor(labels), dtype=np.int64).ravel()
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.size} predictions for {labels.size} labels")
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= classes):
            raise ValueError(f"a {name} outside 0..{classes - 1}")
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator in %, 0 where the denominator is 0 (the report's zero-division rule)."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(100.0 * numerator, denominator, out=out, where=denominator > 0)
    return out


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """support, precision, recall, f1 of every class (percent) from a confusion matrix (rows true)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    hits = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _ratio(hits, predicted)
    recall = _ratio(hits, support)
    total = precision + recall
    f1 = np.zeros_like(total)
    np.divide(2.0 * precision * recall, total, out=f1, where=total > 0)
    return {"support": support, "precision": precision, "recall": recall, "f1": f1}


def averages(table: dict[str, np.ndarray]) -> dict[str, float]:
    """Macro (plain mean over the classes with support) and weighted (by support) precision / recall / F1."""
    support = table["support"]
    present = support > 0
    out: dict[str, float] = {}
    for metric in AVERAGED:
        values = table[metric]
        out[f"{metric}_macro"] = float(values[present].mean()) if present.any() else 0.0
        out[f"{metric}_weighted"] = float((values * support).sum() / support.sum()) if support.sum() else 0.0
    return out


@dataclass
class ClassificationReport:
    """One evaluation's report. ``topk`` maps k to % (k capped at the number of classes)."""

    classnames: list[str]
    confusion: np.ndarray
    topk: dict[int, float]
    table: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.confusion = np.asarray(self.confusion, dtype=np.int64)
        if self.confusion.shape != (len(self.classnames), len(self.classnames)):
            raise ValueError(f"a {self.confusion.shape} confusion matrix for {len(self.classnames)} class names")
        self.table = per_class_metrics(self.confusion)

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    def metrics(self) -> dict[str, float]:
        """Every scalar metric: top1, top3, top5, {precision,recall,f1}_{macro,weighted}."""
        return {**{f"top{k}": float(v) for k, v in sorted(self.topk.items())}, **averages(self.table)}

    def rows(self) -> list[dict[str, Any]]:
        """The per-class table: class, support, precision, recall, f1."""
        return [{"class": name, "support": int(self.table["support"][i]),
                 **{m: float(self.table[m][i]) for m in AVERAGED}} for i, name in enumerate(self.classnames)]


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"need logits N x C and N labels (N > 0), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")


def classification_report(logits: Any, labels: Any, classnames: Sequence[str]) -> ClassificationReport:
    """The report of logits (N x C) against labels (N) for classes named ``classnames`` (C of them)."""
    logits, labels = _as_tensor(logits), _as_tensor(labels).long()
    _check_shapes(logits, labels)
    if logits.shape[1] != len(classnames):
        raise ValueError(f"{logits.shape[1]} columns of logits for {len(classnames)} class names")
    predictions = ranked(logits, min(max(TOP_KS), logits.shape[1]))[:, 0]
    return ClassificationReport(list(classnames), confusion_matrix(predictions, labels, len(classnames)),
                                top_k_accuracy(logits, labels))


# ------------------------------------------------------------------------------------------------- files
def _number(value: float) -> str:
    return repr(float(value))  # shortest text that reads back to the same float


def write_confusion_csv(path: str | os.PathLike, report: ClassificationReport) -> Path:
    """Counts with the class names as header row and first column (rows true, columns predicted)."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([CORNER, *report.classnames])
        for name, row in zip(report.classnames, report.confusion):
            writer.writerow([name, *map(int, row)])
    return Path(path)


def read_confusion_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(class names, counts) of a file written by :func:`write_confusion_csv`."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    names = rows[0][1:]
    if [r[0] for r in rows[1:]] != names:
        raise ValueError(f"{path}: the row names are not the column names")
    return names, np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64).reshape(len(names), -1)


def write_per_class_csv(path: str | os.PathLike, report: ClassificationReport) -> Path:
    """One row per class: class, support, precision, recall, f1 (percent)."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PER_CLASS_COLUMNS)
        for row in report.rows():
            writer.writerow([row["class"], row["support"], *(_number(row[m]) for m in AVERAGED)])
    return Path(path)


def summary_record(report: ClassificationReport, context: dict[str, Any]) -> dict[str, Any]:
    """What summary.json holds: the context (dataset, split, model, method, ...), the counts, every metric."""
    return {**context, "images": report.images, "classes": len(report.classnames),
            "classes_evaluated": int((report.table["support"] > 0).sum()), "units": "percent",
            "metrics": report.metrics()}


def write_summary_json(path: str | os.PathLike, report: ClassificationReport, context: dict[str, Any]) -> Path:
    with atomic_open(path, "w") as handle:
        json.dump(summary_record(report, context), handle, indent=2)
        handle.write("\n")
    return Path(path)


def read_report(folder: str | os.PathLike) -> tuple[ClassificationReport, dict[str, Any]]:
    """A report written by :func:`write_report` (from its confusion matrix and summary.json) and its summary."""
    folder = Path(folder)
    names, counts = read_confusion_csv(folder / CONFUSION_FILE)
    with open(folder / SUMMARY_FILE, encoding="utf-8") as handle:
        summary = json.load(handle)
    topk = {int(key[3:]): float(v) for key, v in summary["metrics"].items() if key.startswith("top")}
    return ClassificationReport(names, counts, topk), summary


# ------------------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    """A figure on an Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def confusion_figure(report: ClassificationReport, title: str = ""):
    """Heat map of the confusion matrix, each row as a share of its true class's images (so rare and common
    classes read alike). Up to 20 classes every cell prints its count; up to 100 every row and column is named
    (smaller type as classes grow); beyond, only some indices are."""
    classes = len(report.classnames)
    side = min(22.0, max(5.0, 2.5 + 0.17 * classes))
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot(1, 1, 1)
    support = report.confusion.sum(axis=1, keepdims=True)
    shares = np.divide(100.0 * report.confusion, support, out=np.zeros(report.confusion.shape), where=support > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=100.0, interpolation="nearest")
    if classes <= CELL_NUMBERS_UP_TO:
        for r in range(classes):
            for c in range(classes):
                if report.confusion[r, c]:
                    ax.text(c, r, str(report.confusion[r, c]), ha="center", va="center", fontsize=8,
                            color="white" if shares[r, c] > 60 else "black")
    if classes <= TICK_LABELS_UP_TO:
        size = 8 if classes <= 30 else (7 if classes <= 60 else 6)
        ax.set_xticks(range(classes))
        ax.set_xticklabels(report.classnames, rotation=90, fontsize=size)
        ax.set_yticks(range(classes))
        ax.set_yticklabels(report.classnames, fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class's images")
    ax.set_title(title or f"top-1 {report.topk[1]:.2f} %, {report.images} images", fontsize=10)
    fig.tight_layout()
    return fig


def comparison_figure(baseline: ClassificationReport, final: ClassificationReport, title: str = "",
                      labels: tuple[str, str] = ("zero-shot", "final")):
    """Baseline against final: the scalar metrics side by side, and each class's recall (up to 60 classes; with
    more, the change of recall per class, sorted)."""
    if baseline.classnames != final.classnames:
        raise ValueError("the baseline and the final report are over different classes")
    classes = len(final.classnames)
    many = classes > 60
    fig = _figure(max(9.0, 4.0 + (0.02 if many else 0.22) * classes), 8.0)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    names = list(final.metrics())
    at = np.arange(len(names))
    for offset, (label, report) in zip((-0.2, 0.2), zip(labels, (baseline, final))):
        values = [report.metrics()[n] for n in names]
        bars = top.bar(at + offset, values, 0.4, label=label)
        top.bar_label(bars, fmt="%.1f", fontsize=6)
    top.set_xticks(at)
    top.set_xticklabels([n.replace("_", " ") for n in names], fontsize=8, rotation=20)
    top.set_ylabel("%")
    top.set_ylim(0, 120)
    top.legend(fontsize=8, loc="upper right", ncol=2)
    recall_before, recall_after = baseline.table["recall"], final.table["recall"]
    if many:
        change = np.sort(recall_after - recall_before)
        bottom.bar(np.arange(classes), change, 1.0, color=np.where(change >= 0, "tab:green", "tab:red"))
        bottom.axhline(0.0, color="black", linewidth=0.6)
        bottom.set_xlabel(f"the {classes} classes, sorted by change")
        bottom.set_ylabel(f"recall {labels[1]} - {labels[0]} (points)")
    else:
        at = np.arange(classes)
        bottom.bar(at - 0.2, recall_before, 0.4, label=labels[0])
        bottom.bar(at + 0.2, recall_after, 0.4, label=labels[1])
        bottom.set_xticks(at)
        bottom.set_xticklabels(final.classnames, rotation=90, fontsize=8 if classes <= 30 else 6)
        bottom.set_ylabel("recall per class (%)")
        bottom.set_ylim(0, 105)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------- a folder
def write_report(folder: str | os.PathLike, report: ClassificationReport, context: dict[str, Any]) -> list[Path]:
    """confusion_matrix.csv, per_class.csv, confusion_matrix.png and summary.json in ``folder`` (each atomic;
    summary.json last, so its presence says the folder is complete)."""
    folder = Path(folder)
    title = f"{context.get('dataset', '')} {context.get('split', '')}: top-1 {report.topk[1]:.2f} %, " \
            f"{report.images} images".strip()
    return [write_confusion_csv(folder / CONFUSION_FILE, report),
            write_per_class_csv(folder / PER_CLASS_FILE, report),
            _save_png(confusion_figure(report, title), folder / HEATMAP_FILE),
            write_summary_json(folder / SUMMARY_FILE, report, context)]


def write_comparison(path: str | os.PathLike, baseline: ClassificationReport, final: ClassificationReport,
                     title: str = "") -> Path:
    return _save_png(comparison_figure(baseline, final, title), path)


def format_line(dataset: str, report: ClassificationReport) -> str:
    """One printed line: top-1/3/5 and macro F1."""
    m = report.metrics()
    shown = "  ".join(f"top{k} {m[f'top{k}']:.2f}" for k in TOP_KS)
    return f"{dataset}: {shown}  macro-F1 {m['f1_macro']:.2f}  ({report.images} images)"
