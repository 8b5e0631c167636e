"""``--report-to wandb``: one Weights & Biases run per save folder, continued (same run id) when the run resumes.

(The file is not called ``wandb.py`` so that nothing can mistake it for the ``wandb`` package.)

Settings: the usual ``WANDB_*`` variables (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ``WANDB_ENTITY``, ...), with
these defaults: ``WANDB_PROJECT`` "mtil", ``WANDB_NAME`` the run's name, ``WANDB_DIR`` the save folder (an offline
run lands in ``<save folder>/wandb/``). The W&B step is mtil's global step; the records of one step are one row.

Two files in the save folder:

* ``wandb_run.json``: the run id, project and entity; a resumed run reads it to continue the same W&B run.
* ``wandb_steps.jsonl``: every ``scalars`` call, one JSON line each, handed to the operating system at once.

Why the second file: W&B sends records through its service process (wandb-core), which buffers them. Offline it
writes the run's transaction log (``run-<id>.wandb``) in 32 KiB blocks; online it sends rows to the server every
few seconds. A kill -9 ends that process as well (it watches its parent) and its buffer is lost, steps older than
the checkpoint included, and nothing can ask it to flush. From this journal a resumed run re-logs the steps before
the checkpoint that W&B lacks.

Resume at step N. W&B refuses a step lower than one it holds (``run.log`` drops it with a warning) and keeps what it
received: only its "rewind" (``resume_from="<id>?_step=<k>"``, which keeps the steps ``<= k``) can remove history.

* Online: the run is continued with ``resume="allow"`` and W&B says the last step it holds, H. If H < N, the steps
  H+1..N-1 come from the journal, then the replay of step N and the new steps: each step once. If H >= N, the
  killed process's steps N..H are rewound away (``resume_from=<id>?_step=N-1``): each step once, with the resumed
  run's values. Rewind is a preview feature that not every W&B server or account offers; when it is refused, the
  run continues after H (one warning): steps N..H keep the values the killed process sent and the resumed run's
  values for them are not sent, so each step still appears once. (Not tested against a live server here.)
* Offline: every session writes its own transaction log (a new ``offline-run-<time>-<id>`` folder, same id), which
  ``wandb sync`` uploads later, oldest first. H is the last step the earlier logs of this run hold, read from them,
  which is what the server will hold. The new log records no rewind, so that syncing it needs no preview feature: it
  holds the journal's steps H+1..N-1, then the replay and the new steps from H+1 on. Each step once; steps N..H (the
  killed process got a 32 KiB block of its log to disk after the checkpoint) keep the killed process's values.
  That ``wandb sync`` uploads the logs of one run one after the other, oldest first, is what the help text of
  wandb 0.31 (installed here) says; how a server merges them was not checked here (wandb/wandb#5865 reports older
  versions replacing a run's history with the log synced last).

A run that reports to W&B only from its resume on has no journal: W&B gets the steps from the checkpoint on.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import string
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

from mtil.atomic import atomic_open
from mtil.errors import UserError
from mtil.records.sink import Scalars, Sink, register_sink

RUN_FILE = "wandb_run.json"
JOURNAL = "wandb_steps.jsonl"
DEFAULT_PROJECT = "mtil"


@register_sink
class WandbSink(Sink):
    """Scalars as W&B history at the global step, the accuracy matrix as a ``wandb.Table`` and an image, the
    summary in ``run.summary`` (plain metric names) and as ``summary/<metric>`` history, the configuration as the
    run's config."""

    name = "wandb"
    may_fail_to_start = True
    install = "pip install wandb (or pip install 'mtil[trackers]')"

    def __init__(self, folder: Path, run_name: str):
        super().__init__(folder, run_name)
        self._run = None
        self._journal = None
        self._floor = 0  # the lowest step W&B accepts from this session
        self._last: int | None = None  # the last step sent
        self._warned_backwards = False

    @classmethod
    def check(cls) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(f"--report-to wandb needs the wandb package: {cls.install}") from None

    # ------------------------------------------------------------------ lifecycle
    def start(self, config: dict[str, Any], resumed_at: int | None, replay: list[tuple[int, Scalars]]) -> None:
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        stored = _read_run_file(self.folder / RUN_FILE) if resumed_at is not None else {}
        run_id = stored.get("id") or new_run_id()
        project = stored.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        entity = stored.get("entity") or os.environ.get("WANDB_ENTITY") or None
        root = Path(os.environ.get("WANDB_DIR") or self.folder)
        root.mkdir(parents=True, exist_ok=True)

        earlier = [] if resumed_at is None else [(s, v) for s, v in _read_journal(self.folder / JOURNAL)
                                                 if s < resumed_at]
        _wait_past(_newest_log_stamp(root, run_id))  # a log folder's name is its start second: never reuse one
        settings = {} if os.environ.get("WANDB_SILENT") or os.environ.get("WANDB_QUIET") else {"quiet": True}
        options = dict(project=project, entity=entity, dir=str(root), reinit="create_new",
                       name=os.environ.get("WANDB_NAME") or self.run_name or None,
                       settings=wandb.Settings(**settings))
        if resumed_at is None:
            self._run = wandb.init(id=run_id, **options)
        else:
            self._run = wandb.init(id=run_id, resume="allow", **options)
            if not self._run.offline and self._run.starting_step - 1 >= resumed_at:
                self._run = self._rewind(wandb, run_id, resumed_at, options)
        if not self._run.offline:
            self._floor = int(self._run.starting_step)
        elif resumed_at is not None:  # what the earlier logs hold is what `wandb sync` will have sent before
            self._floor = last_logged_step(root, run_id) + 1
        # the journal after wandb.init: a W&B that cannot start (no login) leaves no file of this run behind
        with atomic_open(self.folder / JOURNAL) as handle:  # what a later resume may need: the steps before N
            handle.writelines(_journal_line(step, values) for step, values in earlier)
        self._journal = open(self.folder / JOURNAL, "a", encoding="utf-8")
        with atomic_open(self.folder / RUN_FILE) as handle:
            json.dump({"id": run_id, "project": project, "entity": self._run.entity or entity}, handle)
        self._run.config.update(json.loads(json.dumps(config, default=str)), allow_val_change=True)

        if resumed_at is not None and self._floor > resumed_at:
            print(f"mtil: warning: wandb: the run already holds steps {resumed_at}..{self._floor - 1} from the "
                  "interrupted run; they keep its values", file=sys.stderr)
        for step, values in earlier:
            self._log(step, values)
        for step, values in replay:
            self.scalars(step, values)

    def _rewind(self, wandb, run_id: str, resumed_at: int, options: dict):
        """Online only: drop the steps ``>= resumed_at`` the run holds (W&B's rewind); if the server refuses, the
        run continues after the steps it holds."""
        held = self._run.starting_step - 1
        self._run.finish()
        try:
            return wandb.init(resume_from=f"{run_id}?_step={resumed_at - 1}", **options)
        except Exception as exc:  # noqa: BLE001 - a server without rewind: continue rather than fail the run
            print(f"mtil: warning: wandb could not rewind run {run_id} to step {resumed_at} "
                  f"({' '.join(str(exc).split())}); steps {resumed_at}..{held} keep the interrupted run's values",
                  file=sys.stderr)
            return wandb.init(id=run_id, resume="allow", **options)

    def close(self, failed: bool = False) -> None:
        run, self._run = self._run, None
        journal, self._journal = self._journal, None
        try:
            if run is not None:
                run.finish(exit_code=1 if failed else 0)  # a run that stopped on an error shows as failed
        finally:
            if journal is not None:
                journal.close()

    # ------------------------------------------------------------------ records
    def scalars(self, step: int, values: Scalars) -> None:
        if self._run is None:
            return
        self._journal.write(_journal_line(step, values))
        self._journal.flush()
        self._log(step, dict(values))

    def matrix(self, step: int, table, heatmap: Path | None) -> None:
        if self._run is None:
            return
        import wandb

        frame = table.reset_index()
        frame.columns = [str(column) for column in frame.columns]
        payload = {"matrix/accuracy": wandb.Table(dataframe=frame)}
        if heatmap is not None and Path(heatmap).is_file():
            payload["matrix/heatmap"] = wandb.Image(str(heatmap))
        self._log(step, payload)

    def summary(self, step: int, metrics: Scalars) -> None:
        if self._run is None:
            return
        self._log(step, {f"summary/{name}": float(value) for name, value in metrics.items()})
        self._run.summary.update({name: float(value) for name, value in metrics.items()})

    def _log(self, step: int, payload: dict) -> None:
        """One W&B row per step; a step W&B would refuse (below the floor, or lower than the last one sent) is
        not sent, the latter with one warning."""
        step = int(step)
        if step < self._floor:
            return
        if self._last is not None and step < self._last:
            if not self._warned_backwards:
                self._warned_backwards = True
                print(f"mtil: warning: wandb: step {step} after step {self._last} is not sent (W&B steps only "
                      "increase)", file=sys.stderr)
            return
        self._run.log(payload, step=step)
        self._last = step


# ---------------------------------------------------------------------- the two files in the save folder
def new_run_id() -> str:
    """Eight random lowercase letters and digits, the shape of the ids W&B makes itself."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _journal_line(step: int, values: Scalars) -> str:
    return json.dumps({"step": int(step), "values": {str(k): float(v) for k, v in values.items()}}) + "\n"


def _read_journal(path: Path) -> list[tuple[int, Scalars]]:
    """The journal's entries; a line that does not parse (the one a kill cut short) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
            entries.append((int(item["step"]), {str(k): float(v) for k, v in item["values"].items()}))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return entries


def _read_run_file(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


# ---------------------------------------------------------------------- W&B's local transaction logs
_LOG_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")
_BLOCK = 32768
_HEADER = 7  # ":W&B", magic, version; then records framed like LevelDB's log: crc32, length, type, payload


def _log_folders(root: Path, run_id: str) -> list[tuple[str, Path]]:
    """(start stamp, folder) of every local session of ``run_id`` under ``root`` (W&B's ``wandb`` or ``.wandb``)."""
    found = []
    for base in (root / "wandb", root / ".wandb"):
        for folder in base.glob(f"*run-*-{run_id}") if base.is_dir() else ():
            match = _LOG_FOLDER.match(folder.name)
            if match and match.group(2) == run_id and folder.is_dir():
                found.append((match.group(1), folder))
    return found


def _newest_log_stamp(root: Path, run_id: str) -> str | None:
    return max((stamp for stamp, _ in _log_folders(root, run_id)), default=None)


def _wait_past(stamp: str | None) -> None:
    """Sleep until the local time's ``%Y%m%d_%H%M%S`` is past ``stamp`` (at most a second): a W&B session in the
    same second as an earlier one of the same run would get the same folder and overwrite its log."""
    while stamp is not None and time.strftime("%Y%m%d_%H%M%S") <= stamp:
        time.sleep(max(0.01, 1.0 - time.time() % 1.0))


def transaction_log_records(path: Path) -> Iterator[Any]:
    """The records of a ``run-<id>.wandb`` file, as ``wandb_internal_pb2.Record``; stops at a torn or damaged
    record (the tail a kill cut short)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < _HEADER or data[:4] != b":W&B":
        return
    position, pending = _HEADER, b""
    while True:
        room = _BLOCK - position % _BLOCK
        if room < 7:  # a block's last bytes that cannot hold a record header are padding
            position += room
            continue
        if position + 7 > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, position)
        if crc == 0 and length == 0 and kind == 0:  # zero padding up to the block's end
            position += room
            continue
        chunk = data[position + 7:position + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc or kind not in (1, 2, 3, 4):
            return
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last piece of a record split over blocks
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def last_logged_step(root: Path, run_id: str) -> int:
    """The last history step the local transaction logs of ``run_id`` hold (-1: none), taking them oldest first
    as W&B takes them: a log that rewinds the run first drops the steps after its rewind point, a log then adds
    only steps after the last one held (W&B refuses the others)."""
    sessions = []
    for stamp, folder in _log_folders(root, run_id):
        path = folder / f"run-{run_id}.wandb"
        if path.is_file():
            sessions.append((stamp, folder.name, list(transaction_log_records(path))))
    last = -1
    for _, _, records in sorted(sessions, key=lambda s: (s[0], _start_time(s[2]), s[1])):
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run" and record.run.HasField("branch_point") and record.run.branch_point.run == run_id:
                last = min(last, int(record.run.branch_point.value))
            elif kind == "history":
                step = _history_step(record)
                if step is not None and step > last:
                    last = step
    return last


def _start_time(records: list) -> float:
    for record in records:
        if record.WhichOneof("record_type") == "run":
            return record.run.start_time.seconds + record.run.start_time.nanos / 1e9
    return 0.0  # a log a kill cut short before its first block reached the disk: only its folder's stamp orders it


def _history_step(record) -> int | None:
    if record.history.HasField("step"):
        return int(record.history.step.num)
    for item in record.history.item:
        if (list(item.nested_key) or [item.key]) == ["_step"]:
            return int(json.loads(item.value_json))
    return None
