"""One copy of the task-start weights (``mtil.engine.task_start``), shared by L2's anchor, ``--we-wise``'s start and
the trainable part of ``--wise-ref start``'s reference: the same tensors during a task, written once into a mid-task
checkpoint, restored in place on resume (exactly), and checkpoints of an older mtil (the copy in L2's ``anchor`` /
WE's ``start`` / WiSE's full ``start``) still resume exactly.

The runs: micro-vit on ToyShape, 4 steps, ``--checkpoint-interval 2``. The killed run dies after step 3, so its
``latest.pth`` is the step-2 checkpoint; on resume ``before_task`` first captures the *step-2* weights as the
task-start copy, which the checkpoint's copy must replace (else the anchor and the blends are wrong: the run differs).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from mtil.engine.checkpoint import save_checkpoint
from mtil.engine.sequence import SequenceRunner
from mtil.engine.task_start import TaskStartWeights
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods.l2 import L2Consolidation
from mtil.methods.weight_ensemble import WeightEnsemble
from mtil.methods.wise_merge import WiseMerge
from mtil.models.clip_loading import load_clip
from tests.helpers import load, run_killed_at

BASE = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "4", "--batch-size", "8", "--lr",
        "1e-3", "--warmup-length", "1", "--max-evaluation-size", "16", "--batch-size-eval", "8", "--workers", "0",
        "--device", "cpu", "--checkpoint-interval", "2"]
SHARING = ["--l2", "1", "--we", "--avg-freq", "2", "--we-wise", "--wise-merge", "--wise-ref", "start",
           "--wise-ft-alpha", "0.5"]


def command(save: Path, *extra: str) -> list[str]:
    return [*BASE, *extra, "--save", str(save)]


# ------------------------------------------------------------------------------------------------ the holder


def test_holder_captures_lazily_once_refuses_late_and_restores_in_place():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    holder = TaskStartWeights()
    holder.reset()
    assert holder.peek() is None and holder.state_dict() is None  # nobody asked: no copy
    first = holder.get(model)
    assert list(first) == ["weight"] and holder.get(model) is first  # trainable only; one dict for every caller
    assert first["weight"].data_ptr() != model.weight.data_ptr() and torch.equal(first["weight"], model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(holder.get(model)["weight"], model.weight)  # captured once, not again

    holder.reset()
    holder.seal()  # every before_task ran and none asked: a first request now would copy trained weights
    with pytest.raises(RuntimeError, match="before_task"):
        holder.get(model)

    holder.reset()
    shared = holder.get(model)
    saved = {"weight": torch.full((2, 3), 7.0)}
    held_elsewhere = shared["weight"]  # what a component holds
    assert holder.restore(saved) and torch.equal(held_elsewhere, saved["weight"])  # in place: every holder sees it
    assert holder.state_dict()["weight"] is not held_elsewhere  # a checkpoint gets a copy


# ------------------------------------------------------------------------------------------------ runs


def record_components(patch: pytest.MonkeyPatch, seen: dict) -> None:
    """What L2, WE and WiSE hold once their before_task ran, and the engine's holder when a row is evaluated."""
    originals = {cls: cls.before_task for cls in (L2Consolidation, WeightEnsemble, WiseMerge)}
    evaluate_row = SequenceRunner.evaluate_row

    def before_task(cls):
        def wrapped(self, run, task):
            originals[cls](self, run, task)
            seen[cls.name] = {"anchor": getattr(self, "anchor", None), "start": getattr(self, "start", None),
                              "own": set(getattr(self, "own", ())), "holder": run.task_start.peek(),
                              "params": {n: p.data_ptr() for n, p in run.model.named_parameters()}}
        return wrapped

    def recording_row(self, run, after_task):
        seen.setdefault("rows", {})[after_task] = run.task_start.peek()
        return evaluate_row(self, run, after_task)

    for cls in originals:
        patch.setattr(cls, "before_task", before_task(cls))
    patch.setattr(SequenceRunner, "evaluate_row", recording_row)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The uninterrupted run (with what its components held) and the run killed after step 3."""
    root = tmp_path_factory.mktemp("task_start")
    seen: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        record_components(patch, seen)
        assert main(command(root / "straight", *SHARING)) == 0
    killed = root / "killed"
    with pytest.MonkeyPatch.context() as patch:
        run_killed_at(patch, command(killed, *SHARING), [], 3)
    return {"straight": root / "straight", "killed": killed, "seen": seen}


def test_l2_anchor_we_start_and_wise_reference_are_one_copy(runs):
    seen = runs["seen"]
    anchor, start, holder = seen["l2"]["anchor"], seen["we"]["start"], seen["we"]["holder"]
    assert anchor is start is holder  # the same dict ...
    assert set(anchor) == set(seen["l2"]["params"]) - {"logit_scale"}  # (the trainable weights)
    for name, tensor in anchor.items():  # ... of the same tensors: one copy, not the live weights
        assert start[name].data_ptr() == tensor.data_ptr() != seen["l2"]["params"][name], name
    # --wise-ref start reuses them for the trainable weights and copies only the frozen logit_scale itself
    wise = seen["wise_merge"]
    assert wise["own"] == {"logit_scale"} and set(wise["start"]) == set(seen["l2"]["params"])
    assert all(wise["start"][name] is tensor for name, tensor in anchor.items())
    # the task-start weights are the zero-shot ones here (the first task)
    zero_shot = dict(load_clip("micro-vit", seed=0).model.named_parameters())
    assert all(torch.equal(tensor, zero_shot[name]) for name, tensor in anchor.items())
    # freed between tasks: the holder is empty when the task's row is evaluated (and before the first task)
    assert seen["rows"] == {0: None, 1: None}


def _copies_of(payload, start: dict[str, torch.Tensor]) -> list[str]:
    """Where in ``payload`` a dict holds every task-start tensor (equal values under the same names)."""
    found = []

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            if set(start) <= set(value) and all(torch.is_tensor(value[n]) and value[n].shape == t.shape
                                                and torch.equal(value[n], t) for n, t in start.items()):
                found.append(where)
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")

    walk(payload, "checkpoint")
    return found


def test_a_mid_task_checkpoint_holds_the_task_start_weights_once(runs):
    latest = load(runs["killed"] / "latest.pth")
    assert latest["state"]["step"] == 2 and "optimizer" in latest
    start = latest["task_start"]
    assert set(start) == set(latest["model"]) - {"logit_scale"}
    zero_shot = dict(load_clip("micro-vit", seed=0).model.named_parameters())
    assert all(torch.equal(tensor, zero_shot[name]) for name, tensor in start.items())  # the task's start
    assert _copies_of(latest, start) == ["checkpoint.task_start"]  # once: not again in L2's, WE's or WiSE's state
    methods = latest["methods"]
    assert methods["l2"] == {} and set(methods["we"]) == {"average", "count"}
    assert list(methods["wise_merge"]["start"]) == ["logit_scale"]  # WiSE saves only what it copied itself
    # the task-end checkpoints hold none: a task starts by capturing its own
    assert "task_start" not in load(runs["straight"] / "ToyShape.pth")
    assert "task_start" not in load(runs["straight"] / "latest.pth")


def assert_same_run(got: Path, want: Path) -> None:
    pd.testing.assert_frame_equal(mx.read_matrix(got / "accuracy_matrix.csv"),
                                  mx.read_matrix(want / "accuracy_matrix.csv"), check_exact=True)
    for name in ("ToyShape.pth", "latest.pth"):
        a, b = load(got / name), load(want / name)
        assert a["model"].keys() == b["model"].keys() and a["state"] == b["state"], name
        for key in b["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), f"{name}: {key} differs after the resume"
    zero_shot = dict(load_clip("micro-vit", seed=0).model.named_parameters())
    assert not torch.equal(load(want / "ToyShape.pth")["model"]["visual.conv1.weight"],
                           zero_shot["visual.conv1.weight"])  # it trained: the comparison proves something


def resume(folder: Path, capsys) -> Path:
    """The killed run's command again, in ``folder`` (a copy of the killed run's)."""
    capsys.readouterr()
    assert main(command(folder, *SHARING)) == 0
    assert "resuming ToyShape at step 2/4" in capsys.readouterr().out
    return folder


def test_a_mid_task_resume_with_l2_and_we_wise_is_exact(runs, tmp_path, capsys):
    shutil.copytree(runs["killed"], tmp_path / "run")
    assert_same_run(resume(tmp_path / "run", capsys), runs["straight"])


@pytest.mark.parametrize("carriers", [("l2",), ("we",), ("l2", "we", "wise_merge")],
                         ids=["l2-anchor", "we-start", "all-three"])
def test_an_older_checkpoint_with_the_copy_in_the_components_states_resumes_exactly(carriers, runs, tmp_path,
                                                                                     capsys):
    """An older mtil saved no ``task_start``: L2's state held ``anchor``, WE's ``start`` and WiSE's ``start`` every
    base weight. Each one alone restores the shared copy (in place, so the others see it)."""
    payload = load(runs["killed"] / "latest.pth")
    start = payload.pop("task_start")
    methods = payload["methods"]
    if "l2" in carriers:
        methods["l2"]["anchor"] = {n: t.clone() for n, t in start.items()}
    if "we" in carriers:
        methods["we"]["start"] = {n: t.clone() for n, t in start.items()}
    if "wise_merge" in carriers:
        methods["wise_merge"]["start"] = {**{n: t.clone() for n, t in start.items()},
                                          **methods["wise_merge"]["start"]}
    shutil.copytree(runs["killed"], tmp_path / "run")
    save_checkpoint(tmp_path / "run" / "latest.pth", payload)
    assert_same_run(resume(tmp_path / "run", capsys), runs["straight"])
