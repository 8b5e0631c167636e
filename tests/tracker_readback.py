"""Read back what the tracker sinks wrote, the way a user would see it (used by ``tests/test_tracker_sinks.py``).

* TensorBoard: through TensorBoard's own reader (``EventAccumulator``), which honours ``purge_step``.
* W&B (offline runs): from the transaction logs ``<folder>/wandb/offline-run-<time>-<id>/run-<id>.wandb``. One
  run resumed offline has a log per session; they are merged oldest first with the rules W&B applies to a run that
  is continued or rewound, i.e. what the server holds after ``wandb sync`` uploaded them in that order: a log whose
  run record carries a rewind (``branch_point`` on its own run id, ``resume_from``) first drops the rows after the
  rewind step; a log then adds only rows whose ``_step`` is past the last row held (W&B refuses lower steps).
  Summary and config updates of later logs overwrite earlier ones.

Written independently of the sink's own reading of these logs, so that a mistake in one shows in the other.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path


# ---------------------------------------------------------------------------------------------- TensorBoard
def _accumulator(folder: Path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = ea.EventAccumulator(str(Path(folder) / "tensorboard"),
                                      size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.IMAGES: 0})
    accumulator.Reload()
    return accumulator


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag with its (step, value) points in reading order (earlier sessions' purged points gone)."""
    accumulator = _accumulator(folder)
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def tensorboard_texts(folder: Path) -> dict[str, list[tuple[int, str]]]:
    """Every text summary (tag without the ``/text_summary`` suffix) with its (step, text) points."""
    accumulator = _accumulator(folder)
    texts = {}
    for tag in accumulator.Tags()["tensors"]:
        events = accumulator.Tensors(tag)
        texts[tag.removesuffix("/text_summary")] = [
            (event.step, b"".join(event.tensor_proto.string_val).decode("utf-8")) for event in events]
    return texts


def tensorboard_images(folder: Path) -> dict[str, list[tuple[int, int, int]]]:
    """Every image tag with its (step, width, height) points."""
    accumulator = _accumulator(folder)
    return {tag: [(event.step, event.width, event.height) for event in accumulator.Images(tag)]
            for tag in accumulator.Tags()["images"]}


# ---------------------------------------------------------------------------------------------- W&B
@dataclass
class WandbSession:
    """One transaction log: the run record's facts, the history rows, and the summary and config updates."""
    folder: Path
    start: float = 0.0
    rewind_to: int | None = None
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _payloads(path: Path):
    """The serialized records of a W&B transaction log: a 7-byte header (":W&B", magic, version) then LevelDB-log
    framing in 32 KiB blocks (crc32 of type+payload, length, type: 1 full, 2 first, 3 middle, 4 last). Stops
    at the first record that is cut short or fails its checksum."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    at, parts = 7, []
    while at + 7 <= len(data):
        left_in_block = 32768 - at % 32768
        if left_in_block < 7:
            at += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[at:at + 7])
        body = data[at + 7:at + 7 + length]
        if kind == 0 and length == 0:
            at += left_in_block
            continue
        if len(body) != length or zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF != checksum:
            return
        at += 7 + length
        parts = [body] if kind in (1, 2) else parts + [body]
        if kind in (1, 4):
            yield b"".join(parts)
            parts = []


def _items(items) -> dict:
    """Items as a dict: an item's ``nested_key`` is its path (first the logged key, then keys inside its value,
    e.g. a table's ``_type``); a plain ``key`` is a path of one."""
    decoded: dict = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        target = decoded
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)
    return decoded


def read_wandb_session(path: Path, run_id: str) -> WandbSession:
    from wandb.proto import wandb_internal_pb2 as pb

    session = WandbSession(folder=Path(path).parent)
    for payload in _payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            session.start = record.run.start_time.seconds + record.run.start_time.nanos / 1e9
            point = record.run.branch_point
            if point.run == run_id and point.metric == "_step":
                session.rewind_to = int(point.value)
            session.config.update(_items(record.run.config.update))
        elif kind == "history":
            session.rows.append(_items(record.history.item))
        elif kind == "summary":
            session.summary.update(_items(record.summary.update))
            for item in record.summary.remove:
                session.summary.pop((list(item.nested_key) or [item.key])[0], None)
        elif kind == "config":
            session.config.update(_items(record.config.update))
    return session


def wandb_run_id(folder: Path) -> str:
    return json.loads((Path(folder) / "wandb_run.json").read_text())["id"]


def wandb_sessions(folder: Path, run_id: str | None = None) -> list[WandbSession]:
    """The offline sessions of the folder's run (or ``run_id``), oldest first (folder stamp, then start time)."""
    run_id = run_id or wandb_run_id(folder)
    paths = sorted((Path(folder) / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    sessions = [read_wandb_session(path, run_id) for path in paths]
    return sorted(sessions, key=lambda s: (s.folder.name.split("-")[2], s.start))


def wandb_history(folder: Path, run_id: str | None = None) -> list[dict]:
    """The run's history rows (with ``_step`` and the logged keys) as the server holds them after a sync."""
    rows: list[dict] = []
    for session in wandb_sessions(folder, run_id):
        if session.rewind_to is not None:
            rows = [row for row in rows if row["_step"] <= session.rewind_to]
        for row in session.rows:
            if not rows or row["_step"] > rows[-1]["_step"]:
                rows.append(row)
    return rows


def wandb_summary(folder: Path, run_id: str | None = None) -> dict:
    summary: dict = {}
    for session in wandb_sessions(folder, run_id):
        summary.update(session.summary)
    return summary


def wandb_config(folder: Path, run_id: str | None = None) -> dict:
    config: dict = {}
    for session in wandb_sessions(folder, run_id):
        config.update(session.config)
    return config
