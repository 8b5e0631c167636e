"""The one owner of everything a run records: evaluations, per-step training scalars, the accuracy matrix,
few-shot rows, the summary and the configuration. It writes mtil's files (:mod:`mtil.records.files`) and hands
the same records to the trackers that ``--report-to`` names (:mod:`mtil.records.sink`).

Only rank 0 records (other ranks get an owner with no folder and no trackers). The owner remembers what it
recorded at the latest global step; that memory travels in every checkpoint (:meth:`Records.state_dict`), so a
resumed run tells each tracker to drop what the killed process recorded after the checkpoint and replays the
checkpoint's own step: every step then appears once in a tracker's series.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mtil.errors import UserError
from mtil.evaluation import matrix as mx
from mtil.records.files import HEATMAP, FileRecords, write_reports
from mtil.records.sink import Scalars, Sink, sink_class


def evaluation_scalars(record: Mapping[str, Any]) -> Scalars:
    """An evaluation as tracker scalars: ``eval/<Dataset>/top1`` and ``top5``."""
    name = f"eval/{record['dataset']}" + (f"_{record['variant']}" if record.get("variant") else "")
    return {f"{name}/top1": float(record["top1"]), f"{name}/top5": float(record["top5"])}


class Records:
    """See the module docstring. ``folder`` None: nothing is written (no ``--save``, or a rank other than 0)."""

    def __init__(self, folder: Path | None, config_record: Mapping[str, Any], method: str,
                 trackers: Sequence[Sink] = ()):
        self.folder = Path(folder) if folder is not None else None
        self.files = FileRecords(self.folder, config_record) if self.folder is not None else None
        self.trackers = list(trackers) if self.folder is not None else []
        self.config_record = dict(config_record)
        self.method = method
        self._step: int | None = None  # the latest global step recorded at, and what was recorded there
        self._at_step: Scalars = {}

    @classmethod
    def for_run(cls, folder: Path | None, config_record: Mapping[str, Any], method: str,
                report_to: Sequence[str] = (), run_name: str = "", tracker_folder: Path | None = None) -> "Records":
        """The owner of a run writing into ``folder`` (None: records nothing), with a sink per ``report_to``
        name (checked by :func:`mtil.records.sink.check_report_to` when the flags were) keeping its files in
        ``tracker_folder`` (default: ``folder``)."""
        home = tracker_folder or folder
        trackers = [sink_class(name)(home, run_name or method) for name in report_to] if folder else []
        return cls(folder, config_record, method, trackers)

    # ------------------------------------------------------------------ lifecycle
    def start(self, resumed_at: int | None = None) -> None:
        """Open the trackers; on resume, they drop what the run recorded from ``resumed_at`` on and get the
        records of that step replayed (those :meth:`load_state_dict` brought, when they are of that step)."""
        replay = [(self._step, dict(self._at_step))] if resumed_at is not None and self._step == resumed_at \
            and self._at_step else []
        # a tracker that may fail to start (a service: W&B without a login) before those that only write files, so
        # that its failure leaves none of theirs behind
        for tracker in sorted(self.trackers, key=lambda t: not t.may_fail_to_start):
            try:
                tracker.start(self.config_record, resumed_at, replay)
            except Exception as exc:  # noqa: BLE001 - e.g. W&B online without credentials: one line, not a trace
                self.close(failed=True)
                reason = " ".join(str(exc).split())[:300]
                raise UserError(f"--report-to {tracker.name} could not start ({type(exc).__name__}: {reason}); "
                                f"fix it, or drop {tracker.name} from --report-to") from None

    def close(self, failed: bool = False) -> None:
        """Close every tracker (each even when another fails to)."""
        trackers, self.trackers = self.trackers, []
        errors = []
        for tracker in trackers:
            try:
                tracker.close(failed)
            except Exception as exc:  # noqa: BLE001 - the others still close; the first failure is raised
                errors.append(exc)
        if errors:
            raise errors[0]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the latest step recorded at and its records. The trackers are flushed first,
        so that everything the checkpoint says was recorded is on disk."""
        for tracker in self.trackers:
            tracker.flush()
        return {"step": self._step, "at_step": dict(self._at_step)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self._step = state.get("step")
        self._at_step = {str(k): float(v) for k, v in (state.get("at_step") or {}).items()}

    # ------------------------------------------------------------------ records
    def _to_trackers(self, step: int, values: Scalars) -> None:
        if self._step != step:
            self._step, self._at_step = step, {}
        self._at_step.update(values)
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def scalars(self, step: int, values: Scalars) -> None:
        """Training scalars at a global step (the progress line's: each loss term, lr, images/s, task)."""
        if self.trackers:
            self._to_trackers(step, {k: float(v) for k, v in values.items() if not math.isnan(float(v))})

    def evaluation(self, record: Mapping[str, Any], task: int) -> None:
        """One evaluation (:func:`mtil.records.files.result_record`); ``task``: the task index it belongs to."""
        if self.files is not None:
            self.files.evaluation(record)
        if self.trackers:
            step, values = int(record["iteration"]), evaluation_scalars(record)
            if self._step != step or "eval/task" not in self._at_step:  # once per row of evaluations
                values["eval/task"] = float(task)
            self._to_trackers(step, values)

    def fewshot(self, after_task: int, rows: list[dict]) -> None:
        if self.files is not None:
            self.files.fewshot(after_task, rows)

    def matrix_cells(self, rows: list[dict], sequence: list[str]) -> None:
        if self.files is not None and rows:
            self.files.matrix_cells(rows, sequence)

    def config(self, record: dict, applied: dict[str, dict], typed: set[str], derived: tuple[str, ...] = (),
               task_keys: tuple[str, ...] = ()) -> None:
        if self.files is not None:
            self.files.config(record, applied, typed, derived, task_keys)

    def final(self, trained: list[str], step: int, log=None) -> dict | None:
        """The end of the sequence: print the matrix and its metrics, write summary.csv and the heat map, and
        give the trackers the matrix, its heat map and the summary. Returns the summary row (None: no matrix)."""
        long = self.files.matrix() if self.files is not None else None
        if long is None:
            return None
        if not trained:  # e.g. contrastive pre-training: the matrix shows zero-shot ability before and after
            print(mx.to_wide(long, list(dict.fromkeys(long["dataset"]))).round(2).to_string())
            return None
        row = write_reports(self.folder, self.method, long, trained, log)
        if self.trackers:
            table: pd.DataFrame = mx.to_wide(long, trained)
            metrics = {k: float(v) for k, v in row.items() if k != "method" and isinstance(v, (int, float))}
            for tracker in self.trackers:
                tracker.matrix(step, table, self.folder / HEATMAP)
                tracker.summary(step, {k: v for k, v in metrics.items() if not math.isnan(v)})
        return row
