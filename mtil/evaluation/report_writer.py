"""``--report``: listens to the evaluator's logits and writes the classification reports of the evaluations that
describe a run: its last row (after the last task; an ``--eval-only`` run's only one) in ``<save>/reports/<Dataset>/``
and its zero-shot row in ``<save>/reports/<Dataset>/baseline/``, with the baseline-vs-final chart beside them.

It only listens (the evaluator's loop is unchanged): the run says when a row starts (:meth:`ReportWriter.begin`)
and ends (:meth:`ReportWriter.finish`). A report is always of the test split over all of a dataset's classes; a
row that evaluated no such thing (``--base-new``: the matrix cell is on the base classes) gets one more evaluation,
of all classes, for the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from mtil.evaluation import report as rp
from mtil.evaluation.metrics_io import safe_name

BASELINE = "baseline"  # the zero-shot row (after_task 0)
FINAL = "final"  # the last row of a run, or an --eval-only evaluation
REPORTS_FOLDER = "reports"


def stage_of(after_task: int | None, tasks: int) -> str | None:
    """Which report a matrix row gives: the zero-shot row the baseline, the row after the last task the final
    one, any other (earlier tasks, mid-task evaluations) none."""
    if after_task == 0:
        return BASELINE
    return FINAL if after_task is not None and after_task >= tasks else None


class ReportWriter:
    """Writes reports under ``root`` (``<save>/reports``) for the evaluations of the row in progress.

    ``context`` goes into every summary.json (model, method, ...); ``suffix`` is added to each dataset's folder
    name (an ``--eval-only --wise-ft`` blend is another model than its checkpoint, as in its metric files).
    """

    def __init__(self, root: str | Path, context: dict[str, Any], suffix: str = ""):
        self.root = Path(root)
        self.context = dict(context)
        self.suffix = suffix
        self.evaluator = None
        self.stage: str | None = None
        self.row: dict[str, Any] = {}
        self.written: dict[str, tuple[Path, rp.ClassificationReport]] = {}

    def attach(self, evaluator) -> "ReportWriter":
        """Listen to ``evaluator`` (a ZeroShotEvaluator); returns self."""
        self.evaluator = evaluator
        evaluator.logits_listeners.append(self.listen)
        return self

    def folder(self, dataset: str, stage: str = FINAL) -> Path:
        folder = self.root / (safe_name(dataset) + self.suffix)
        return folder / BASELINE if stage == BASELINE else folder

    def begin(self, stage: str | None, **row: Any) -> None:
        """A row starts: its evaluations are reported as ``stage`` (None: not reported); ``row`` (after_task,
        iteration) goes into their summary.json."""
        self.stage, self.row, self.written = stage, row, {}

    def begin_row(self, after_task: int | None, tasks: int, **row: Any) -> None:
        """A row of a sequence run of ``tasks`` tasks starts (see :func:`stage_of`)."""
        self.begin(stage_of(after_task, tasks), after_task=after_task, **row)

    def listen(self, result, split: str, part: str, logits, labels) -> None:
        """The evaluator's listener: report the test split over all classes while a reported row is running."""
        if self.stage is None or split != "test" or part != "all":
            return
        name = result.dataset
        report = rp.classification_report(logits, labels, self.evaluator.task(name).classnames)
        folder = self.folder(name, self.stage)
        context = {"dataset": name, "split": split, "classes_part": part, "report": self.stage,
                   "head": result.head, **self.context, **self.row}
        if self.stage == FINAL:
            context["baseline_chart"] = self._compare(name, report)
        rp.write_report(folder, report, context)
        self.written[name] = (folder, report)

    def _compare(self, name: str, report: rp.ClassificationReport) -> str | None:
        """Draw the baseline-vs-final chart when the dataset's baseline report is there (and over the same
        classes); otherwise remove a chart an earlier report left. Returns the chart's file name or None."""
        chart = self.folder(name) / rp.COMPARISON_FILE
        baseline_folder = self.folder(name, BASELINE)
        baseline = None
        if (baseline_folder / rp.SUMMARY_FILE).is_file():
            try:
                baseline = rp.read_report(baseline_folder)[0]
            except (OSError, ValueError, KeyError, IndexError):
                baseline = None  # a damaged baseline: no chart rather than a wrong one
        if baseline is None or baseline.classnames != report.classnames:
            chart.unlink(missing_ok=True)
            return None
        rp.write_comparison(chart, baseline, report, f"{name}: zero-shot (baseline/) against the final model")
        return chart.name

    def finish(self, names: Iterable[str], say: Callable[[str], None] = print) -> list[Path]:
        """The row is over: evaluate all classes of the datasets the row reported nothing for, say what was
        written, stop reporting. Returns the folders written."""
        if self.stage is not None:
            for name in names:
                if name not in self.written:
                    self.evaluator.evaluate(name, "test", "all")  # listen() writes it
            for name, (folder, report) in self.written.items():
                say(f"report ({self.stage}) {folder}: {rp.format_line(name, report)}")
        folders = [folder for folder, _ in self.written.values()]
        self.stage, self.row, self.written = None, {}, {}
        return folders

    def catch_up(self, names: Iterable[str], say: Callable[[str], None] = print, **row: Any) -> list[Path]:
        """A finished run re-run with --report: the final reports it lacks, from its final weights."""
        missing = [n for n in names if not (self.folder(n) / rp.SUMMARY_FILE).is_file()]
        if not missing:
            return []
        self.begin(FINAL, **row)
        return self.finish(missing, say)
