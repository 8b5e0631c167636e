"""Helpers shared by the run-level tests: reading checkpoints, and killing a run mid-task."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest

from mtil.main import main
from mtil.methods.finetune import Finetune
from mtil.tensor_files import load_tensors


def load(path: Path) -> dict:
    """A checkpoint as mtil reads it (verified against its checksums, ``weights_only``: a test fails if anything
    pickled sneaks in)."""
    return load_tensors(path, "checkpoint")


def run_killed_at(monkeypatch, argv: Sequence[str], completed: list[str], step: int, method=Finetune) -> None:
    """Simulate a kill: the files on disk are then exactly what a SIGKILL would leave. Run ``argv`` in-process and die (SystemExit 137) right after ``step`` of the task that follows
    ``completed``; the last periodic checkpoint before it is what a resumed run starts from. ``method`` is the
    class whose ``after_step`` is wrapped (every method inherits Finetune's; components' hooks run after it)."""
    original = method.after_step

    def after_step_then_die(self, run):
        original(self, run)
        if run.state.completed == completed and run.state.step == step:
            raise SystemExit(137)

    with monkeypatch.context() as patch:
        patch.setattr(method, "after_step", after_step_then_die)
        with pytest.raises(SystemExit):
            main(list(argv))
