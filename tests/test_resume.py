"""Exact resume: a run stopped anywhere and re-run with the same command ends exactly as an uninterrupted run.

How the interruptions are simulated (in-process, so they are cheap and deterministic):

* "stopped after its first task": ``SequenceRunner.evaluate_row`` is wrapped so that, after writing the
  after-task-1 row, it raises. On disk is then what a kill at that moment leaves: ``ToyShape.pth`` and a
  ``latest.pth`` saved at the task's end (its row marked not yet written), rows 0 and 1 of the matrix.
* "killed mid-task": with ``--checkpoint-interval 2`` the method's ``after_step`` hook raises ``SystemExit`` at
  step 5 of task 2, i.e. after step 4's checkpoint was written and step 5's update was made in memory only.
  The loop never gets to save again, so the files are exactly what a SIGKILL after step 5 leaves.

The real signal path (SIGUSR1 -> save at the next step -> exit 3) is tested once with a subprocess.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from mtil.datasets.toyworld import ToyTaskDataset
from mtil.engine.sequence import SequenceRunner
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods.finetune import Finetune
from tests.helpers import load, run_killed_at

ROOT = Path(__file__).resolve().parent.parent

COMMAND = ["--model", "micro-vit", "--train-dataset", "ToyShape,ToyColor", "--iterations", "6",
           "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "2", "--max-evaluation-size", "24",
           "--batch-size-eval", "24", "--workers", "0", "--device", "cpu", "--checkpoint-interval", "2"]


def command(save: Path, *extra: str) -> list[str]:
    return [*COMMAND, *extra, "--save", str(save)]


@contextmanager
def optimizer_steps():
    """Every optimiser step taken inside the block (a global post-step hook)."""
    calls: list[torch.optim.Optimizer] = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    try:
        yield calls
    finally:
        handle.remove()


def outcome(save: Path) -> dict:
    """What a finished run leaves that must not depend on interruptions."""
    matrix = mx.read_matrix(save / "accuracy_matrix.csv")
    cells, order = mx.matrix_from_results(save / "results.jsonl")  # full-precision values, last per cell
    checkpoints = {name: load(save / name) for name in ("ToyShape.pth", "ToyColor.pth", "latest.pth")}
    return {"matrix": matrix, "cells": cells, "order": order, "checkpoints": checkpoints}


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def assert_same_outcome(got: dict, want: dict) -> None:
    pd.testing.assert_frame_equal(got["matrix"], want["matrix"], check_exact=True)
    pd.testing.assert_frame_equal(got["cells"], want["cells"], check_exact=True)
    assert got["order"] == want["order"] == ["ToyShape", "ToyColor"]
    for name, ckpt in want["checkpoints"].items():
        other = got["checkpoints"][name]
        assert_same_tensors(other["model"], ckpt["model"], f"{name} weights")
        assert other["state"] == ckpt["state"], name
        assert other["iteration"] == ckpt["iteration"], name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (a)."""
    save = tmp_path_factory.mktemp("reference") / "run"
    with optimizer_steps() as steps:
        assert main(command(save)) == 0
    assert len(steps) == 12
    result = outcome(save)
    assert len(result["matrix"]) == 6  # rows 0, 1, 2 x two datasets
    assert result["checkpoints"]["latest.pth"]["state"]["completed"] == ["ToyShape", "ToyColor"]
    return result


class StopHere(Exception):
    pass


def test_uninterrupted_run_is_reproducible_and_trains(reference, tmp_path):
    """(a) is deterministic, and the model actually moved (else the resume comparisons would prove nothing)."""
    first, last = reference["checkpoints"]["ToyShape.pth"]["model"], reference["checkpoints"]["ToyColor.pth"]["model"]
    assert not torch.equal(first["visual.conv1.weight"], last["visual.conv1.weight"])
    assert main(command(tmp_path / "again")) == 0
    assert_same_outcome(outcome(tmp_path / "again"), reference)


def test_stopped_after_first_task_then_rerun_matches(reference, tmp_path, monkeypatch, capsys):
    """(b) Stopped right after task 1's row was written; the same command finishes the run identically.
    Then a re-run of the finished run only reports it and changes nothing."""
    save = tmp_path / "run"
    original = SequenceRunner.evaluate_row

    def evaluate_then_stop(self, run, after_task):
        rows = original(self, run, after_task)
        if after_task == 1:
            raise StopHere
        return rows

    with monkeypatch.context() as m:
        m.setattr(SequenceRunner, "evaluate_row", evaluate_then_stop)
        with pytest.raises(StopHere):
            main(command(save))
    latest = load(save / "latest.pth")
    assert latest["state"]["completed"] == ["ToyShape"] and latest["state"]["step"] == 0
    assert "optimizer" not in latest
    assert not (save / "ToyColor.pth").exists()

    with optimizer_steps() as steps:
        assert main(command(save)) == 0
    assert len(steps) == 6  # only task 2 was trained again
    assert_same_outcome(outcome(save), reference)

    # A finished run: re-running reports it and changes nothing.
    capsys.readouterr()
    before = {name: (save / name).read_bytes() for name in ("accuracy_matrix.csv", "results.jsonl", "latest.pth",
                                                            "ToyColor.pth", "metrics_ToyShape.csv")}
    with optimizer_steps() as steps:
        assert main(command(save)) == 0
    assert steps == []
    assert "already holds this finished run" in capsys.readouterr().out
    for name, content in before.items():
        assert (save / name).read_bytes() == content, f"{name} changed by re-running a finished run"


def test_killed_mid_task_then_rerun_matches(reference, tmp_path, monkeypatch, capsys):
    """(c) Killed at step 5 of task 2 (last checkpoint: step 4). Another configuration is refused; the same
    command resumes from step 4 and ends identically; --force-resume resumes with another configuration."""
    save = tmp_path / "run"
    run_killed_at(monkeypatch, command(save), ["ToyShape"], 5)
    latest = load(save / "latest.pth")
    assert latest["state"]["completed"] == ["ToyShape"]
    assert latest["state"]["step"] == 4 and latest["iteration"] == 10
    assert "optimizer" in latest and "scheduler" in latest

    # A different configuration on this unfinished run: refused with one line, nothing touched.
    capsys.readouterr()
    latest_bytes = (save / "latest.pth").read_bytes()
    assert main(command(save, "--lr", "2e-3")) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtil: error:") and err.strip().count("\n") == 0
    assert "--force-resume" in err and "lr" in err
    assert (save / "latest.pth").read_bytes() == latest_bytes

    forced = tmp_path / "forced"
    shutil.copytree(save, forced)

    with optimizer_steps() as steps:
        assert main(command(save)) == 0
    assert len(steps) == 2  # steps 5 and 6 of task 2
    assert "resuming ToyColor at step 4/6" in capsys.readouterr().out
    assert_same_outcome(outcome(save), reference)

    with optimizer_steps() as steps:
        assert main(command(forced, "--lr", "2e-3", "--force-resume")) == 0
    assert len(steps) == 2
    assert "--force-resume" in capsys.readouterr().out
    done = load(forced / "latest.pth")
    assert done["state"]["completed"] == ["ToyShape", "ToyColor"]
    assert done["config"]["lr"] == 2e-3


class StepCounter(Finetune):
    """Fine-tuning with a per-task state that ``before_task`` resets (as OGD/EWC-like methods do)."""

    name = "counting"

    def __init__(self, config):
        super().__init__(config)
        self.steps_in_task = 0
        self.tasks_started = 0

    def before_task(self, run, task):
        super().before_task(run, task)
        self.steps_in_task = 0
        self.tasks_started += 1

    def after_step(self, run):
        super().after_step(run)
        self.steps_in_task += 1

    def state_dict(self):
        return {"steps_in_task": self.steps_in_task, "tasks_started": self.tasks_started}

    def load_state_dict(self, state):
        self.steps_in_task = state.get("steps_in_task", 0)
        self.tasks_started = state.get("tasks_started", 0)


def test_method_state_survives_a_mid_task_resume(tmp_path, monkeypatch):
    """The method interface: on a mid-task resume ``load_state_dict`` comes after ``before_task`` (overriding its reset)."""
    from mtil import registry

    monkeypatch.setitem(registry._REGISTRY, "counting", StepCounter)
    save = tmp_path / "run"
    argv = ["--model", "micro-vit", "--method", "counting", "--train-dataset", "ToyShape", "--iterations", "4",
            "--batch-size", "4", "--warmup-length", "1", "--lr", "1e-3", "--eval-datasets", "ToyShape",
            "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu", "--checkpoint-interval", "2",
            "--save", str(save)]
    run_killed_at(monkeypatch, argv, [], 3, method=StepCounter)
    assert load(save / "latest.pth")["methods"]["counting"] == {"steps_in_task": 2, "tasks_started": 1}
    assert main(argv) == 0
    assert load(save / "ToyShape.pth")["methods"]["counting"] == {"steps_in_task": 4, "tasks_started": 1}


@pytest.mark.parametrize("mode", ["image-fc", "fc"])
def test_linear_head_modes_resume_exactly(mode, tmp_path, monkeypatch):
    """A learned head (and fc mode's cached features) survive a mid-task kill: same weights, same head."""
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 48)
    argv = ["--model", "micro-vit", "--train-mode", mode, "--train-dataset", "ToyShape", "--iterations", "4",
            "--batch-size", "8", "--warmup-length", "1", "--lr", "1e-3", "--eval-datasets", "ToyShape",
            "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu", "--checkpoint-interval", "2"]
    assert main([*argv, "--save", str(tmp_path / "straight")]) == 0
    killed = tmp_path / "killed"
    run_killed_at(monkeypatch, [*argv, "--save", str(killed)], [], 3)
    assert load(killed / "latest.pth")["state"]["step"] == 2
    assert main([*argv, "--save", str(killed)]) == 0
    want, got = load(tmp_path / "straight" / "ToyShape.pth"), load(killed / "ToyShape.pth")
    assert_same_tensors(got["model"], want["model"], "weights")
    assert got["heads"]["ToyShape"]["kind"] == want["heads"]["ToyShape"]["kind"] == "linear"
    assert_same_tensors(got["heads"]["ToyShape"]["tensors"], want["heads"]["ToyShape"]["tensors"], "head")
    pd.testing.assert_frame_equal(mx.read_matrix(killed / "accuracy_matrix.csv"),
                                  mx.read_matrix(tmp_path / "straight" / "accuracy_matrix.csv"), check_exact=True)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGUSR1, 3), (signal.SIGINT, 130)])
def test_sigusr1_or_ctrl_c_saves_and_the_rerun_matches(signum, code, tmp_path):
    """The real preemption path in a subprocess: SIGUSR1 -> checkpoint at the next step -> exit 3; re-running
    the same command resumes and ends as an uninterrupted (in-process) run of that command. Ctrl-C (SIGINT) saves
    the same way (issue 25: before, it saved nothing and the re-run restarted the task at step 0), exit 130."""
    argv = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "60", "--batch-size", "4",
            "--lr", "1e-3", "--warmup-length", "2", "--eval-datasets", "ToyShape", "--max-evaluation-size", "8",
            "--workers", "0", "--device", "cpu", "--checkpoint-interval", "0"]
    save = tmp_path / "preempted"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"  # as in this process (see _one_torch_thread): same kernels, same numbers
    full = [sys.executable, "-m", "mtil.main", *argv, "--save", str(save)]

    proc = subprocess.Popen(full, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        # latest.pth first appears right after the zero-shot row, i.e. once training is about to start.
        while not (save / "latest.pth").is_file():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stdout.read()}"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.02)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, out
    assert signal.Signals(signum).name in out
    latest = load(save / "latest.pth")
    assert 0 < latest["state"]["step"] < 60, latest["state"]
    assert latest["state"]["completed"] == [] and "optimizer" in latest
    assert not (save / "ToyShape.pth").exists()

    done = subprocess.run(full, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming ToyShape at step {latest['state']['step']}/60" in done.stdout
    if signum == signal.SIGINT:  # the same save path as SIGUSR1's, whose resumed run is compared below
        return

    straight = tmp_path / "straight"
    assert main([*argv, "--save", str(straight)]) == 0
    pd.testing.assert_frame_equal(mx.read_matrix(save / "accuracy_matrix.csv"),
                                  mx.read_matrix(straight / "accuracy_matrix.csv"), check_exact=True)
    assert_same_tensors(load(save / "ToyShape.pth")["model"], load(straight / "ToyShape.pth")["model"],
                        "final weights")


# ------------------------------------------------------------------------------------------------ older runs
def _as_version_1(path: Path) -> None:
    """Rewrite a checkpoint's configuration record as mtil wrote it before 2026-11-24 (record version 1):
    image_loss/text_loss resolved to true, no lwf_sentences, precision, task_settings or record_version."""
    payload = load(path)
    config = {k: v for k, v in payload["config"].items()
              if k not in ("lwf_sentences", "precision", "task_settings", "record_version")}
    config["image_loss"] = config["text_loss"] = True
    payload["config"] = config
    torch.save(payload, path)


SHORT = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
         "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu", "--train-dataset", "ToyShape",
         "--iterations", "4", "--checkpoint-interval", "2"]


def _killed_run_of_the_previous_version(monkeypatch, capsys, argv: list[str], save) -> None:
    """A run killed mid-task whose latest.pth is then rewritten as the previous version wrote it."""
    run_killed_at(monkeypatch, [*argv, "--save", str(save)], [], 3)
    _as_version_1(save / "latest.pth")
    capsys.readouterr()


def test_a_run_written_by_the_previous_version_resumes(tmp_path, monkeypatch, capsys):
    save = tmp_path / "old"
    _killed_run_of_the_previous_version(monkeypatch, capsys, SHORT, save)
    assert main([*SHORT, "--save", str(save)]) == 0
    assert "resuming ToyShape at step 2/4" in capsys.readouterr().out


def test_an_old_lwf_run_resumes_with_the_sentences_it_used(tmp_path, monkeypatch, capsys):
    """LwF used every template before; an old LwF run asks for that setting instead of silently changing."""
    argv = [*SHORT, "--method", "lwf", "--ref-batch-size", "4"]
    save = tmp_path / "old-lwf"
    _killed_run_of_the_previous_version(monkeypatch, capsys, argv, save)
    assert main([*argv, "--save", str(save)]) == 2
    assert "--lwf-sentences all-templates -> first-template" in capsys.readouterr().err
    assert main([*argv, "--lwf-sentences", "all-templates", "--save", str(save)]) == 0


def test_force_resume_refuses_what_the_interrupted_optimiser_cannot_carry(tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*SHORT, "--save", str(save)], [], 3)
    before = {p.name: p.read_bytes() for p in save.iterdir()}
    for change in (["--optimizer", "sgd"], ["--train-mode", "image"], ["--lora"]):
        capsys.readouterr()
        assert main([*SHORT, *change, "--force-resume", "--save", str(save)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--force-resume cannot carry" in err and change[0] in err, err
    assert {p.name: p.read_bytes() for p in save.iterdir()} == before
    assert main([*SHORT, "--lr", "2e-3", "--force-resume", "--save", str(save)]) == 0  # the lr can change


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_start_up_is_a_stop_request_not_death(tmp_path, signum):
    """Sent while the process is still importing torch (before it could have reached training), the signal is kept
    and honoured at the first step: exit 3 with a checkpoint, so train.sh requeues; it used to kill the process
    (exit 143/138), which train.sh does not requeue. An evaluation-only job still ends on it as usual."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    save = tmp_path / "run"
    train = [sys.executable, "-m", "mtil.main", "--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations",
             "3", "--batch-size", "4", "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu",
             "--save", str(save)]
    evaluate = [sys.executable, "-m", "mtil.main", "--model", "micro-vit", "--eval-only", "--eval-datasets",
                "ToyShape", "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu"]
    outputs = []
    for argv, expected in ((train, {3}), (evaluate, {-signum, 128 + signum})):
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        time.sleep(0.8)  # python is up and the handlers are in; torch's import takes longer than this
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode in expected, (proc.returncode, out)
        outputs.append(out)
    # the request is met at the first boundary after start-up: the zero-shot row (before training began, a stop
    # request waited for step 1)
    assert f"stopped by {signal.Signals(signum).name} after the zero-shot row" in outputs[0]
    state = load(save / "latest.pth")["state"]
    assert state["zero_shot_evaluated"] and state["step"] == 0 and state["completed"] == []


def test_a_second_ctrl_c_quits_at_once():
    """The first Ctrl-C only asks for a save at the next step; a second one does not wait for it."""
    from mtil.engine.preemption import StopFlag, stop_on_signals

    flag = StopFlag()
    with stop_on_signals(flag, interrupt=True):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes of this thread
        assert flag.requested and flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_stops_a_training_free_run_at_the_next_row(tmp_path):
    """A training-free method has no step to stop at: the request is met after the next row (found in review: one
    Ctrl-C went on through every task and exited 0), said once even with DataLoader workers, and the same command
    resumes and finishes."""
    save = tmp_path / "zs"
    argv = [sys.executable, "-m", "mtil.main", "--model", "micro-vit", "--method", "zeroshot", "--train-dataset",
            "ToyWorld", "--max-evaluation-size", "300", "--workers", "2", "--device", "cpu", "--save", str(save)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (save / "latest.pth").is_file():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the zero-shot row never ended"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert err.count("Ctrl-C: saving") == 1, err
    assert not load(save / "latest.pth")["state"]["completed"] == load(save / "latest.pth")["state"]["sequence"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (save / "summary.csv").is_file()
