"""``--report-to tensorboard``: event files under ``<save folder>/tensorboard``.

Resume: the resumed run opens a new event file with TensorBoard's own ``purge_step=resumed_at``, a session-start
marker that readers honour by dropping every event of the earlier files at steps ``>= resumed_at``; then it writes
the checkpoint's replay. Readers process a folder's event files in name order and a name starts with the creation
second, so a resumed run never opens its file in the same second as the newest one already there (it waits for the
next second, which only ever happens in tests): otherwise its purge marker could be read before the killed run's
events.

Durability: every call flushes the writer, i.e. waits until its writer thread has handed the queued events to the
file (no fsync: a kill -9 keeps what the operating system holds). A kill -9 then loses nothing that was handed
over, in particular nothing older than the checkpoint the run resumes from. (Without TensorFlow installed,
TensorBoard's writer appends each event to the file as soon as its thread takes it, so only the queue is at risk;
TensorFlow's file writer buffers as well.) The flush costs about 0.25-0.3 ms a call (measured on a loaded 2-core
machine, next to about 0.05 ms for the four ``add_scalar`` of a training step), small next to a training step.
Flushing when a checkpoint is written would be enough, but a sink is not told when.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mtil.errors import UserError
from mtil.records.sink import Scalars, Sink, register_sink

SUBFOLDER = "tensorboard"
_EVENT_FILE_PREFIX = "events.out.tfevents."


@register_sink
class TensorBoardSink(Sink):
    """Scalars as TensorBoard scalars, the accuracy matrix as a markdown text and an image, the summary as
    ``summary/<metric>`` scalars, the configuration as a text at the first step."""

    name = "tensorboard"
    install = "pip install tensorboard (or pip install 'mtil[trackers]')"

    def __init__(self, folder: Path, run_name: str):
        super().__init__(folder, run_name)
        self._writer = None

    @classmethod
    def check(cls) -> None:
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError(f"--report-to tensorboard needs the tensorboard package: {cls.install}") from None

    @property
    def logdir(self) -> Path:
        return self.folder / SUBFOLDER

    def start(self, config: dict[str, Any], resumed_at: int | None, replay: list[tuple[int, Scalars]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir.mkdir(parents=True, exist_ok=True)
        earlier = _newest_event_second(self.logdir)
        # A fresh run in a folder that already holds event files hides them all (purge from step 0), so that two
        # unrelated runs never mix in one series.
        purge_step = resumed_at if resumed_at is not None else (0 if earlier is not None else None)
        if purge_step is not None and earlier is not None:
            _wait_past_second(earlier)
        self._writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge_step)
        if not resumed_at or earlier is None:  # the configuration at step 0, unless an earlier session's is kept
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self._writer.add_text("config", "```\n" + text + "\n```", global_step=0)
        for step, values in replay:
            self._add_scalars(step, values)
        self._writer.flush()

    def scalars(self, step: int, values: Scalars) -> None:
        if self._writer is None:
            return
        self._add_scalars(step, values)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def matrix(self, step: int, table, heatmap: Path | None) -> None:
        if self._writer is None:
            return
        self._writer.add_text("matrix/accuracy", markdown_table(table), global_step=step)
        if heatmap is not None and Path(heatmap).is_file():
            import numpy as np
            from PIL import Image

            with Image.open(heatmap) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._writer.add_image("matrix/heatmap", pixels, global_step=step, dataformats="HWC")
        self._writer.flush()

    def summary(self, step: int, metrics: Scalars) -> None:
        if self._writer is None:
            return
        self._add_scalars(step, {f"summary/{name}": value for name, value in metrics.items()})
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()  # flushes

    def _add_scalars(self, step: int, values: Scalars) -> None:
        """All of a call's scalars as one event (one Summary holding a value per tag): a quarter of the cost of
        ``add_scalar`` per tag at a progress line's four; TensorBoard reads each value as its tag's point."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])
        self._writer.file_writer.add_summary(summary, global_step=int(step))


def markdown_table(table) -> str:
    """The wide accuracy matrix as a markdown table (TensorBoard's text tab renders markdown); empty cells for
    NaN. Written here rather than with ``DataFrame.to_markdown``, which needs the optional ``tabulate``."""
    index_name = table.index.name or ""
    header = [str(index_name)] + [str(column) for column in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        cells = ["" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"
                 for value in row.tolist()]
        lines.append("| " + " | ".join([str(index)] + cells) + " |")
    return "\n".join(lines)


def _newest_event_second(logdir: Path) -> int | None:
    """The creation second in the name of the newest event file in ``logdir`` (None: none there)."""
    seconds = []
    for path in logdir.glob(_EVENT_FILE_PREFIX + "*"):
        stamp = path.name[len(_EVENT_FILE_PREFIX):].split(".", 1)[0]
        if stamp.isdigit():
            seconds.append(int(stamp))
    return max(seconds, default=None)


def _wait_past_second(second: int) -> None:
    """Sleep until the wall clock is past ``second`` (at most a second), so a new event file sorts after it."""
    while int(time.time()) <= second:
        time.sleep(max(0.01, second + 1 - time.time()))
