"""Whether and from what a run resumes: the newest good checkpoint in its folder, and whether this command may
continue it (same settings, ``--force-resume``, or the next link of a one-process-per-task chain).

Nothing here writes: the decision is made while the run is still being checked.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from mtil.engine.checkpoint import (
    LATEST,
    PREVIOUS,
    config_differences,
    config_for_checkpoint,
    describe_differences,
    load_resumable,
)
from mtil.engine.state import TrainingState
from mtil.errors import UserError
from mtil.evaluation.metrics_io import task_checkpoint_path
from mtil.flags import flags_with_role
from mtil.tensor_files import file_damage


@dataclass
class SavedRun:
    """A checkpoint a run can resume from, where it was read, and whether it is ``latest.pth`` itself."""

    payload: dict[str, Any]
    path: Path
    is_latest: bool


def find_saved(folder: Path | None, speak: bool = True) -> SavedRun | None:
    """The checkpoint to resume from: latest.pth, or when it is damaged (or gone while latest.prev.pth is there)
    the newest good earlier one: latest.prev.pth, then the task checkpoints, newest first. Never starts over
    silently: with no good checkpoint it is a one-line error. ``speak``: say which fallback was taken (rank 0)."""
    if folder is None:
        return None
    latest, previous = folder / LATEST, folder / PREVIOUS
    if not latest.is_file() and not previous.is_file():
        return None
    damage = f"{latest} is missing"
    if latest.is_file():
        try:
            return SavedRun(load_resumable(latest), latest, True)
        except UserError as exc:
            damage = str(exc)
    tasks = sorted((p for p in folder.glob("*.pth") if p.name not in (LATEST, PREVIOUS)),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for fallback in [previous, *tasks]:
        if not fallback.is_file():
            continue
        try:
            saved = load_resumable(fallback)
        except UserError:
            continue
        state = saved["state"]
        if speak:
            print(f"mtil: {damage}; resuming from the last good checkpoint {fallback} (after "
                  f"{len(state.get('completed', []))} tasks, step {state.get('step', 0)})")
        return SavedRun(saved, fallback, False)
    raise UserError(f"{damage}, and {folder} holds no earlier good checkpoint ({PREVIOUS} or a task "
                    f"checkpoint) to resume from; move the folder away to start over")


def check_finished_run(folder: Path, state: TrainingState) -> None:
    """Re-running a finished run verifies its task checkpoints (those ``--keep-checkpoints`` kept), one at a time:
    a one-line UserError naming the first damaged one, before anything is written."""
    for index, name in enumerate(state.completed):
        path = task_checkpoint_path(folder, name)
        damage = file_damage(path, "its task checkpoint") if path.is_file() else None
        if damage is not None:
            raise UserError(f"{folder} holds this finished run, but {damage}; the weights after "
                            f"task {index + 1} ({name}) are lost, its metrics are not (they are checked against "
                            f"results.jsonl): run the command again with another --save to recreate them")


def continues_chain(config: argparse.Namespace, folder: Path) -> bool:
    """A chain link loads the previous link's task checkpoint from the same folder."""
    return bool(config.load) and Path(config.load).resolve().parent == folder.resolve()


def decide(saved: dict[str, Any], config: argparse.Namespace, record: dict[str, Any], folder: Path,
           path_keys: Iterable[str] = ()) -> dict[str, Any] | None:
    """``saved`` if this command resumes it; None if it starts the next link of a chain; else a UserError.
    ``record``: this command's configuration record. An interrupted task cannot continue across a change of the
    flags whose role is ``shapes_optimizer`` (they decide which parameters the optimiser holds)."""
    state = TrainingState.from_dict(saved["state"])
    differences = config_differences(saved.get("config", {}), record, getattr(config, "_defaults", {}),
                                     set(path_keys), ignore=getattr(config, "_unused", ()),
                                     roles=config._roles)
    if not differences:
        return saved
    if state.finished and continues_chain(config, folder):
        return None  # the previous link of a one-process-per-task chain: this link starts from its checkpoint
    described = describe_differences(differences)
    if state.finished:
        raise UserError(
            f"{folder} holds a finished run with other settings (saved -> now: {described}); use another "
            f"--save (a chain's next link must --load a checkpoint from that folder)"
        )
    mid_task = state.step > 0 and "optimizer" in saved
    shaping = flags_with_role(config, "shapes_optimizer")
    structural = [k for k, _, _ in differences if k in shaping]
    if config.force_resume and mid_task and structural:
        raise UserError(
            f"--force-resume cannot carry {folder}'s interrupted task over a change of "
            f"{', '.join('--' + k.replace('_', '-') for k in structural)}: its saved optimiser state belongs to "
            f"other parameters; resume with the saved values (saved -> now: {described}) or use another --save")
    if config.force_resume:
        print(f"--force-resume: resuming although these settings changed (saved -> now): {described} (a task "
              f"interrupted mid-way keeps its saved optimiser and schedule; new settings apply from the next task)")
        return saved
    raise UserError(
        f"{folder} holds an unfinished run with other settings (saved -> now: {described}); re-run with "
        f"its settings to resume, pass --force-resume to resume anyway, or use another --save"
    )


def chain_state(checkpoint: dict, config: argparse.Namespace) -> dict:
    """The task history a ``--load``ed mtil checkpoint passes on.

    A checkpoint of a run of the same method continues that run's sequence (the one-process-per-task chain: its
    tasks, step count and zero-shot weights carry over). One from another method — e.g. contrastive pre-training —
    only provides starting weights: a new sequence starts from them, and they are its zero-shot weights.
    """
    previous = checkpoint.get("state") or {}
    if (checkpoint.get("config") or {}).get("method") != config.method:
        return {}
    return previous


def base_spec(config: argparse.Namespace, path_keys: Iterable[str] = frozenset()) -> dict:
    """How to rebuild the zero-shot (pre-sequence) weights: recorded in the state, so that every link of a chain
    and every resumed run refers to the same weights without storing a second copy in each checkpoint (paths
    resolved, so a chain link started from another folder finds them)."""
    record = config_for_checkpoint({k: getattr(config, k) for k in ("model", "load", "clip_root")},
                                   set(path_keys) | {"load", "clip_root"}, roles=config._roles)
    return {**record, "untrained": config.untrained, "seed": config.seed}
