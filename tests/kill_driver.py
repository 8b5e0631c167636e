"""Run mtil in this process and die like SIGKILL at one named point (used by ``tests/test_kill_anywhere.py``).

    python -m tests.kill_driver POINT MARKER [mtil arguments ...]

installs the patch that POINT names, then calls ``mtil.main.main(arguments)``. At the point it writes MARKER
(a JSON object saying where it was) and calls ``os._exit(137)``: no ``finally`` block, no ``atexit`` handler, no
buffered file is flushed by Python, so the save folder holds exactly what a SIGKILL at that instant leaves. If
the point is never reached the run ends normally with mtil's own exit code and no marker, which the test
reports as a failure.

The points assume the test's run: ``--train-dataset ToyShape,ToyColor --iterations 4 --checkpoint-interval 2``
(periodic ``latest.pth`` at step 2 of each task) and an evaluation set of at least two batches.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

KILLED = 137
FIRST, SECOND = "ToyShape", "ToyColor"


def die(marker: Path, **facts) -> None:
    """Say where, then end the process at once (as SIGKILL would: nothing else of Python runs)."""
    marker.write_text(json.dumps(facts))
    sys.stdout.flush()  # only so that the test can show the run's output; files in --save are not touched
    sys.stderr.flush()
    os._exit(KILLED)


def mid_step(marker: Path) -> None:
    """Task 1, step 3: the forward and backward pass are done (gradients exist), the optimiser step has begun
    (its pre-hook runs inside ``optimizer.step()``) and has not updated the weights. The last checkpoint is the
    periodic ``latest.pth`` of step 2."""
    from mtil.engine import loop

    original = loop.optimization_step

    def optimization_step(run, hooks, optimizer, *args, **kwargs):
        state = run.state
        if state.completed == [] and state.step + 1 == 3:
            def inside_step(opt, _args, _kwargs):
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                die(marker, point="mid-step", task=state.current_task, step=state.step + 1,
                    gradients=len(grads), nonzero_gradients=sum(bool(g.abs().sum() > 0) for g in grads))

            optimizer.register_step_pre_hook(inside_step)
        return original(run, hooks, optimizer, *args, **kwargs)

    loop.optimization_step = optimization_step  # train_steps looks it up in the module at each step


def mid_evaluation(marker: Path) -> None:
    """The evaluation after task 1: ToyShape's row is written (metrics file and results.jsonl), ToyColor's first
    batch is classified, its second is about to be. ``latest.pth`` is the one saved at the end of task 1."""
    from mtil.engine.sequence import SequenceRunner
    from mtil.evaluation.zeroshot import ZeroShotEvaluator

    current: dict = {}
    evaluate_row, loader = SequenceRunner.evaluate_row, ZeroShotEvaluator.loader

    def evaluate_row_noting(self, run, after_task):
        current["after_task"] = after_task
        return evaluate_row(self, run, after_task)

    class DiesAtSecondBatch:
        def __init__(self, batches, name):
            self.batches, self.name = batches, name

        def __iter__(self):
            for index, batch in enumerate(self.batches):
                if index == 1:  # the loop body has run for batch 0
                    die(marker, point="mid-evaluation", after_task=current["after_task"], dataset=self.name,
                        batches_evaluated=index)
                yield batch

    def loader_dying(self, name, *args, **kwargs):
        batches = loader(self, name, *args, **kwargs)
        if current.get("after_task") == 1 and name == SECOND:
            return DiesAtSecondBatch(batches, name)
        return batches

    SequenceRunner.evaluate_row = evaluate_row_noting
    ZeroShotEvaluator.loader = loader_dying


def _dying_writes(marker: Path, point: str, target_name: str, wanted) -> None:
    """Kill inside the ``torch.save`` of the checkpoint named ``target_name`` whose state ``wanted`` accepts,
    once about half of its tensor bytes are in the temporary file (flushed and synced, as a kill long after
    they were written would find them), i.e. before ``atomic_open`` renames it."""
    from mtil.engine import checkpoint, sequence

    save_checkpoint, atomic_open = sequence.save_checkpoint, checkpoint.atomic_open
    armed: dict = {}

    class DyingWriter:
        def __init__(self, handle, limit: int):
            self.handle, self.limit, self.written = handle, limit, 0

        def write(self, data) -> int:
            data = memoryview(data).cast("B")
            if self.written + len(data) >= self.limit:
                part = self.limit - self.written
                self.handle.write(data[:part])
                self.handle.flush()
                os.fsync(self.handle.fileno())
                die(marker, point=point, file=armed["path"].name, state=armed["state"],
                    bytes_written=self.written + part, payload_tensor_bytes=armed["tensor_bytes"])
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    @contextmanager
    def atomic_open_dying(path, mode="w"):
        with atomic_open(path, mode) as handle:
            if armed and Path(path) == armed["path"]:
                yield DyingWriter(handle, armed["tensor_bytes"] // 2)
            else:
                yield handle

    def save_checkpoint_arming(path, payload, *args, **kwargs):
        path = Path(path)
        if path.name == target_name and wanted(payload["state"]):
            armed.update(path=path, state={k: payload["state"][k] for k in ("completed", "step")},
                         tensor_bytes=sum(t.numel() * t.element_size() for t in payload["model"].values()))
        return save_checkpoint(path, payload, *args, **kwargs)

    sequence.save_checkpoint = save_checkpoint_arming
    checkpoint.atomic_open = atomic_open_dying


def mid_save_latest(marker: Path) -> None:
    """Half-way through writing the periodic ``latest.pth`` of task 2, step 2 (the one it replaces, saved after
    task 1's evaluation, is already linked as ``latest.prev.pth``)."""
    _dying_writes(marker, "mid-save-latest", "latest.pth",
                  lambda state: state["completed"] == [FIRST] and state["step"] == 2)


def mid_save_task_checkpoint(marker: Path) -> None:
    """Half-way through writing ``ToyColor.pth`` at the end of task 2 (``latest.pth``: task 2, step 2)."""
    _dying_writes(marker, "mid-save-task-checkpoint", f"{SECOND}.pth", lambda state: True)


def between_task_checkpoint_and_latest(marker: Path) -> None:
    """``ToyShape.pth`` is complete and renamed into place; the ``latest.pth`` that follows it is not begun
    (``latest.pth`` on disk: task 1, step 2)."""
    from mtil.engine import sequence

    save_checkpoint = sequence.save_checkpoint

    def save_checkpoint_then_die(path, payload, *args, **kwargs):
        written = save_checkpoint(path, payload, *args, **kwargs)
        if Path(path).name == f"{FIRST}.pth":
            die(marker, point="between-task-checkpoint-and-latest", file=Path(path).name,
                state={k: payload["state"][k] for k in ("completed", "step")})
        return written

    sequence.save_checkpoint = save_checkpoint_then_die


POINTS = {
    "mid-step": mid_step,
    "mid-evaluation": mid_evaluation,
    "mid-save-latest": mid_save_latest,
    "mid-save-task-checkpoint": mid_save_task_checkpoint,
    "between-task-checkpoint-and-latest": between_task_checkpoint_and_latest,
}


def run(argv: list[str]) -> int:
    point, marker, mtil_argv = argv[0], Path(argv[1]), argv[2:]
    POINTS[point](marker)
    from mtil.main import main

    return main(mtil_argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
