"""Never lose a run: a training run killed (as by SIGKILL) at any of several points, then re-run with the same
command, ends exactly as the uninterrupted run: same accuracy matrix, metric files and evaluation records, and
bit-identical checkpoints (``ToyShape.pth``, ``ToyColor.pth``, ``latest.pth``: weights, heads, method states,
counters and RNG states -- the RNG a later task's randomness such as LoRA dropout starts from); no temporary file
of an interrupted write is left. results.jsonl is append-only: an evaluation the kill interrupted is evaluated
again on resume and its first dataset's line appears twice; an exact repeat (apart from ``time``) counts once.

Each killed run is a subprocess (``tests/kill_driver.py``): it patches one mtil function so that at the chosen
instant it writes a marker and calls ``os._exit(137)`` -- no ``finally``, no ``atexit``, so the save folder holds
exactly what a SIGKILL there leaves. The resume is a plain ``python -m mtil.main`` with the same arguments.

The run: ToyShape then ToyColor, 4 steps each, ``--checkpoint-interval 2`` (``latest.pth`` at step 2 of each
task, at each task's end together with ``<Task>.pth``, and after each evaluation row), evaluation sets of two
batches. The kill points (which function the driver patches):

* ``mid-step``: task 1 step 3, inside ``optimizer.step()`` after the backward pass, before the update (an
  optimiser step pre-hook registered by a wrapped ``mtil.engine.loop.optimization_step``); resumes at step 2.
* ``mid-evaluation``: the evaluation after task 1, ToyColor's second batch (``ZeroShotEvaluator.loader``
  wrapped; ToyShape's row of that evaluation is already in its metrics file and results.jsonl).
* ``mid-save-latest``: half-way through the temporary file of task 2's step-2 ``latest.pth`` (``atomic_open`` in
  ``mtil.engine.checkpoint`` hands ``torch.save`` a writer that dies); resumes at the start of task 2.
* ``mid-save-task-checkpoint``: the same, in ``ToyColor.pth`` at the end of task 2; resumes at task 2 step 2.
* ``between-task-checkpoint-and-latest``: ``ToyShape.pth`` written and renamed, the ``latest.pth`` that follows
  not begun (``save_checkpoint`` as called by ``mtil.engine.sequence`` wrapped); resumes at task 1 step 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load

ROOT = Path(__file__).resolve().parent.parent
KILLED = 137

COMMAND = ["--model", "micro-vit", "--train-dataset", "ToyShape,ToyColor", "--iterations", "4",
           "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1", "--max-evaluation-size", "16",
           "--batch-size-eval", "8", "--workers", "0", "--device", "cpu", "--checkpoint-interval", "2",
           "--threads", "1"]
CHECKPOINTS = ("ToyShape.pth", "ToyColor.pth", "latest.pth")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def mtil(save: Path, cwd: Path) -> subprocess.CompletedProcess:
    return _run(["-m", "mtil.main", *COMMAND, "--save", str(save)], cwd)


def killed(point: str, save: Path, marker: Path, cwd: Path) -> subprocess.CompletedProcess:
    return _run(["-m", "tests.kill_driver", point, str(marker), *COMMAND, "--save", str(save)], cwd)


def records(save: Path) -> list[dict]:
    """results.jsonl's records without their wall-clock ``time``, in order; a record repeated exactly (an
    evaluation the kill interrupted is evaluated again on resume, appending the same line) counts once."""
    out = []
    for line in (save / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("time", None)
        record["config"].pop("save", None)  # the folder differs between the runs compared
        if record not in out:
            out.append(record)
    return out


def outcome(save: Path) -> dict:
    """What a finished run leaves that must not depend on interruptions."""
    texts = {p.name: p.read_text() for p in sorted(save.glob("metrics_*.csv"))}
    texts["accuracy_matrix.csv"] = (save / "accuracy_matrix.csv").read_text()
    return {"texts": texts, "records": records(save), "checkpoints": {n: load(save / n) for n in CHECKPOINTS}}


def assert_identical(got, want, where: str) -> None:
    """Checkpoint contents equal: tensors bitwise (torch.equal, same dtype), everything else ==."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_identical(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want)):
            assert_identical(a, b, f"{where}[{index}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_same_outcome(got: dict, want: dict) -> None:
    assert got["texts"].keys() == want["texts"].keys()
    for name, text in want["texts"].items():
        assert got["texts"][name] == text, f"{name} differs"
    assert got["records"] == want["records"], "results.jsonl records differ"
    for name, checkpoint in want["checkpoints"].items():
        other = dict(got["checkpoints"][name])
        mine = dict(checkpoint)
        for payload in (other, mine):
            payload["config"] = {k: v for k, v in payload["config"].items() if k != "save"}
        assert_identical(other, mine, name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Where every run starts: relative defaults (``--data-location data``, ``--clip-root``) resolve alike, so the
    configuration recorded in the checkpoints and results.jsonl compares equal apart from ``--save``."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, workdir) -> dict:
    """The uninterrupted run, the same command in a subprocess."""
    save = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = mtil(save, workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    result = outcome(save)
    first, last = (result["checkpoints"][n]["model"]["visual.conv1.weight"] for n in ("ToyShape.pth", "ToyColor.pth"))
    assert not torch.equal(first, last)  # task 2 moved the weights: comparing them proves something
    assert len(result["records"]) == 6  # rows 0, 1, 2 x two datasets: the comparison has something to compare
    return result


# point -> (what the marker must say, (completed, step) of latest.pth right after the kill, "resuming" line)
POINTS = {
    "mid-step": (
        {"task": "ToyShape", "step": 3}, ([], 2), "resuming ToyShape at step 2/4"),
    "mid-evaluation": (
        {"after_task": 1, "dataset": "ToyColor", "batches_evaluated": 1}, (["ToyShape"], 0), None),
    "mid-save-latest": (
        {"file": "latest.pth", "state": {"completed": ["ToyShape"], "step": 2}}, (["ToyShape"], 0), None),
    "mid-save-task-checkpoint": (
        {"file": "ToyColor.pth", "state": {"completed": ["ToyShape", "ToyColor"], "step": 0}}, (["ToyShape"], 2),
        "resuming ToyColor at step 2/4"),
    "between-task-checkpoint-and-latest": (
        {"file": "ToyShape.pth", "state": {"completed": ["ToyShape"], "step": 0}}, ([], 2),
        "resuming ToyShape at step 2/4"),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_run_killed_here_resumes_to_the_same_result(point, reference, workdir, tmp_path):
    facts, (completed, step), resuming = POINTS[point]
    save, marker = tmp_path / "run", tmp_path / "killed-at.json"

    # 1. Killed at the point: exit code 137 and the driver's marker prove it died there, not elsewhere.
    died = killed(point, save, marker, workdir)
    output = died.stdout + died.stderr
    assert died.returncode == KILLED, f"exit {died.returncode}, the kill point was not reached:\n{output}"
    assert marker.is_file(), output
    said = json.loads(marker.read_text())
    assert said["point"] == point
    assert {k: said[k] for k in facts} == facts, said
    latest = load(save / "latest.pth")["state"]
    assert (latest["completed"], latest["step"]) == (completed, step), latest
    orphans = sorted(p.name for p in save.glob(".*.tmp"))
    if point == "mid-step":
        assert said["gradients"] > 0 and said["nonzero_gradients"] > 0, said  # the backward pass had run
    if point == "mid-evaluation":  # the first dataset's row of this evaluation was written, the second's not
        rows = [(r["after_task"], r["dataset"]) for r in records(save)]
        assert (1, "ToyShape") in rows and (1, "ToyColor") not in rows, rows
    if point.startswith("mid-save"):
        # its temporary file is there, partly written; the file it was to replace is untouched (latest.pth: the
        # state checked above) or was never there (the task checkpoint)
        partial = [save / o for o in orphans if o.startswith(f".{said['file']}.")]
        assert len(partial) == 1, orphans
        assert 0 < partial[0].stat().st_size == said["bytes_written"] < said["payload_tensor_bytes"]
        if said["file"] != "latest.pth":
            assert not (save / said["file"]).exists()
    if point == "between-task-checkpoint-and-latest":
        assert load(save / "ToyShape.pth")["state"]["completed"] == ["ToyShape"]

    # 2. The same command, unchanged, resumes and finishes.
    done = mtil(save, workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    if resuming:
        assert resuming in done.stdout, done.stdout
    if orphans:
        assert f"removed {len(orphans)} temporary file(s)" in done.stdout, done.stdout
    assert sorted(p.name for p in save.glob(".*.tmp")) == []

    # 3. ... to the uninterrupted run's results, bit for bit.
    assert_same_outcome(outcome(save), reference)
