"""The training engine: step counts, schedule, data stream, checkpoints, chains, sequence files, gradient tracker."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from mtil.datasets.toyworld import ToyTaskDataset
from mtil.engine.data_stream import batch_stream
from mtil.engine.gradients import GradientTracker
from mtil.engine.schedule import warmup_cosine
from mtil.evaluation import matrix as mx
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.main import main
from mtil.models.text import zeroshot_head
from tests.helpers import load, run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "8", "--batch-size-eval", "16", "--workers", "0", "--device", "cpu"]


@contextmanager
def optimizer_steps():
    """``(optimizer, its lr at the step)`` for every optimiser step taken inside the block."""
    calls: list[tuple[torch.optim.Optimizer, float]] = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: calls.append((opt, opt.param_groups[0]["initial_lr"])))
    try:
        yield calls
    finally:
        handle.remove()


def steps_per_optimizer(calls) -> list[int]:
    counts: dict[int, int] = {}
    for opt, _ in calls:
        counts[id(opt)] = counts.get(id(opt), 0) + 1
    return list(counts.values())


# ------------------------------------------------------------------------------------------------ step counts


def test_iterations_run_exactly_n_steps_per_task(tmp_path):
    with optimizer_steps() as calls:
        assert main([*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "3",
                     "--eval-datasets", "ToyShape", "--save", str(tmp_path)]) == 0
    assert steps_per_optimizer(calls) == [3, 3]
    latest = load(tmp_path / "latest.pth")
    assert latest["iteration"] == latest["state"]["global_step"] == 6


def test_epochs_run_epochs_times_batches_per_epoch(tmp_path, monkeypatch):
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 20)  # 20 images: ceil(20 / 8) = 3 steps an epoch
    with optimizer_steps() as calls:
        assert main([*FAST, "--train-dataset", "ToyShape", "--epochs", "2", "--eval-datasets", "ToyShape"]) == 0
    assert steps_per_optimizer(calls) == [6]


def test_iterations_and_epochs_together_are_refused(capsys):
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "3", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--iterations" in err and "--epochs" in err and err.count("\n") == 1


def test_mid_task_evaluation_uses_the_current_text_encoder(tmp_path, monkeypatch):
    """``--eval-interval``: heads of a mid-task evaluation come from the text encoder as it is then."""
    original = ZeroShotEvaluator.head
    checked = []

    def checked_head(self, name):
        head = original(self, name)
        task = self.task(name)
        fresh = zeroshot_head(self.model, task.classnames, task.templates)
        checked.append(torch.allclose(head.weight, fresh, atol=1e-6))
        return head

    monkeypatch.setattr(ZeroShotEvaluator, "head", checked_head)
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "4", "--eval-interval", "2",
                 "--eval-datasets", "ToyShape", "--save", str(tmp_path)]) == 0
    assert len(checked) == 3  # zero-shot, step 2, after the task
    assert all(checked), checked
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["after_task"], r["iteration"]) for r in records] == [(0, 0), (None, 2), (1, 4)]


# ------------------------------------------------------------------------------------------------ schedule


def _lr_trace(peak: float, warmup: int, total: int, steps: int) -> list[float]:
    """The learning rate at each of ``steps`` optimiser steps under ``warmup_cosine``."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    scheduler = warmup_cosine(optimizer, warmup=warmup, total=total)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_schedule_values():
    lrs = _lr_trace(2.0, warmup=4, total=12, steps=13)
    expected = [2.0 * (s + 1) / 4 for s in range(4)]  # 0.5, 1.0, 1.5, 2.0
    expected += [2.0 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 8)) for s in range(4, 13)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[4] == pytest.approx(2.0) and lrs[8] == pytest.approx(1.0) and lrs[12] == pytest.approx(0.0)
    # No warm-up: the peak at step 0, then cosine down to 0 at the last step.
    assert _lr_trace(1.0, warmup=0, total=4, steps=5) == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


# ------------------------------------------------------------------------------------------------ data stream


class Items(torch.utils.data.Dataset):
    """Item i is the tensor [i]; the transform adds random noise, so seeding of augmentations shows."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


def noisy(x):
    return x + torch.rand(1) * 1e-3


def stream(start=0, total=8, seed=0, stream_id=1):
    loader = batch_stream(Items(), noisy, batch_size=4, seed=seed, stream=stream_id, start_step=start,
                          total_steps=total, workers=0, pin_memory=False)
    return list(loader)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_stream_is_reproducible_and_independent_of_global_rng():
    torch.manual_seed(1)
    first = stream()
    torch.manual_seed(2)
    second = stream()
    assert same(first, second)
    assert len(first) == 8 and all(len(b[1]) == 4 for b in first)
    assert not same(first, stream(seed=1))
    assert not same(first, stream(stream_id=2))


def test_stream_resumed_at_step_k_equals_the_rest_of_the_full_stream():
    full = stream()
    for k in (1, 3, 7):
        assert same(stream(start=k), full[k:])
    assert stream(start=8) == []


def test_stream_epochs_are_different_permutations_covering_every_item_once():
    labels = torch.cat([b[1] for b in stream(total=5)]).tolist()  # 20 draws = epochs 0 and 1 of 10 items
    epoch0, epoch1 = labels[:10], labels[10:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    # The augmentation depends on the draw: the same item in two epochs gets different noise.
    values = torch.cat([b[0] for b in stream(total=5)]).flatten()
    assert (values.round() == torch.tensor(labels, dtype=torch.float)).all()
    item = epoch0[0]
    assert values[epoch0.index(item)] != values[10 + epoch1.index(item)]


# ------------------------------------------------------------------------------------------------ checkpoints, chains


def test_checkpoint_contents_chain_and_summarize(tmp_path, monkeypatch, capsys):
    save = tmp_path / "A"
    first = [*FAST, "--train-dataset", "ToyShape", "--iterations", "4", "--checkpoint-interval", "2",
             "--save", str(save)]
    run_killed_at(monkeypatch, first, [], 3)

    mid = load(save / "latest.pth")  # must load with weights_only=True
    assert {"model", "optimizer", "scheduler", "methods", "rng", "state", "config", "arch", "iteration",
            "heads", "format", "version"} <= set(mid)
    assert mid["format"] == "mtil-checkpoint"
    assert mid["state"]["step"] == 2 and mid["iteration"] == 2 and mid["state"]["completed"] == []
    assert len(mid["optimizer"]["state"]) > 0 and mid["scheduler"]["last_epoch"] == 2
    assert mid["methods"] == {"finetune": {}}
    assert {"python", "numpy", "torch"} <= set(mid["rng"])
    assert mid["config"]["lr"] == 1e-3 and mid["config"]["train_dataset"] == "ToyShape"
    assert mid["arch"]["embed_dim"] > 0
    assert set(mid["model"]) >= {"visual.conv1.weight", "text_projection", "logit_scale"}

    assert main(first) == 0
    task = load(save / "ToyShape.pth")
    assert "optimizer" not in task and "scheduler" not in task
    assert task["state"]["completed"] == ["ToyShape"] and task["iteration"] == 4

    # The next link of a one-task-per-process chain: same folder, --load the previous task's checkpoint.
    capsys.readouterr()
    assert main([*FAST, "--load", str(save / "ToyShape.pth"), "--train-dataset", "ToyColor", "--iterations", "4",
                 "--save", str(save)]) == 0
    assert "ToyShape, ToyColor" in capsys.readouterr().out
    last = load(save / "ToyColor.pth")
    assert last["state"]["completed"] == ["ToyShape", "ToyColor"] and last["iteration"] == 8
    assert torch.equal(load(save / "latest.pth")["model"]["text_projection"], last["model"]["text_projection"])
    records = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines()]
    after = [(r["after_task"], r["dataset"], r["sequence"]) for r in records if r["after_task"]]
    # the link filled ToyColor into the earlier rows (tests/test_chain_fill.py), then evaluated its own row
    assert after == [(1, "ToyShape", ["ToyShape"]), (1, "ToyColor", ["ToyShape"]),
                     (2, "ToyShape", ["ToyShape", "ToyColor"]), (2, "ToyColor", ["ToyShape", "ToyColor"])]
    assert records[-1]["iteration"] == 8

    for name in ("accuracy_matrix.csv", "summary.csv"):
        (save / name).unlink()
    assert main(["--summarize", str(save)]) == 0
    long = mx.read_matrix(save / "accuracy_matrix.csv")
    assert list(zip(long["after_task"], long["dataset"])) == [
        (0, "ToyShape"), (0, "ToyColor"), (1, "ToyShape"), (1, "ToyColor"), (2, "ToyShape"), (2, "ToyColor")]
    header = (save / "accuracy_matrix.csv").read_text().splitlines()[0]
    assert header.startswith("after_task,dataset")
    summary = mx.read_summary(save / "summary.csv")
    assert len(summary) == 1 and summary[0]["method"] == "finetune"
    last_row = [r for r in records if r["after_task"] == 2]
    assert summary[0]["last"] == pytest.approx(sum(r["top1"] for r in last_row) / 2, abs=1e-3)


# ------------------------------------------------------------------------------------------------ sequence files


def test_sequence_file_per_task_settings(tmp_path):
    sequence = tmp_path / "seq.yaml"
    # "2e-3" is a string to YAML 1.1 (PyYAML): it must still be the number 0.002.
    sequence.write_text("tasks:\n  - {dataset: ToyShape, lr: 2e-3, iterations: 2}\n  - ToyColor\n")
    with optimizer_steps() as calls:
        assert main([*FAST, "--sequence", str(sequence), "--iterations", "3", "--eval-datasets", "ToyShape",
                     "--save", str(tmp_path / "run")]) == 0
    assert steps_per_optimizer(calls) == [2, 3]
    assert [lr for _, lr in calls] == [2e-3] * 2 + [1e-3] * 3
    log = (tmp_path / "run" / "train.log").read_text()
    assert "[ToyShape] step 2/2" in log and "[ToyColor] step 3/3" in log


@pytest.mark.parametrize("text, words", [
    ("tasks: [ToyShape, {dataset: ToyColor\n", ["not valid YAML"]),
    ("tasks:\n  - {dataset: ToyShape, momentum: 0.9}\n", ["momentum", "lr"]),
    ("tasks: []\n", ["non-empty"]),
    ("tasks:\n  - ToyShape\n  - {dataset: ToyColor, iterations: two}\n", ["task 2", "iterations", "'two'"]),
    ("tasks:\n  - {dataset: ToyShape, iterations: 2, epochs: 1}\n", ["iterations", "epochs"]),
    ("tasks:\n  - {dataset: ToyShape, lr: -1.0e-3}\n", ["lr", "positive"]),
])
def test_bad_sequence_files_exit_2(tmp_path, capsys, text, words):
    sequence = tmp_path / "seq.yaml"
    sequence.write_text(text)
    assert main([*FAST, "--sequence", str(sequence), "--iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtil: error:") and err.count("\n") == 1
    for word in words:
        assert word in err


# ------------------------------------------------------------------------------------------------ gradients


def test_evenly_spaced_steps():
    assert GradientTracker.evenly_spaced(3, 10) == [0, 4, 9]
    assert GradientTracker.evenly_spaced(2, 10) == [0, 9]
    assert GradientTracker.evenly_spaced(1, 10) == [0]
    assert GradientTracker.evenly_spaced(5, 3) == [0, 1, 2]
    assert GradientTracker.evenly_spaced(0, 10) == [] and GradientTracker.evenly_spaced(3, 0) == []
    spaced = GradientTracker.evenly_spaced(7, 100)
    assert len(spaced) == 7 and spaced[0] == 0 and spaced[-1] == 99


def test_gradient_tracker_records_chosen_steps():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    tracker = GradientTracker(model, ["0.weight", "1.bias"], steps=[1, 3])
    with pytest.raises(KeyError):
        GradientTracker(model, ["nope"], steps=[0])
    expected = []
    for step in range(5):
        model.zero_grad(set_to_none=True)
        (model(torch.full((1, 3), float(step + 1))).sum()).backward()
        if step in (1, 3):
            expected.append(model[0].weight.grad.flatten().clone())
        assert tracker.maybe_record(step) == (step in (1, 3))
        assert not tracker.maybe_record(step)  # once per step
    assert tracker.recorded_steps == [1, 3]
    stacked = tracker.stacked("0.weight")
    assert stacked.shape == (2, 6) and stacked.device.type == "cpu"
    assert torch.equal(stacked, torch.stack(expected))
    assert torch.equal(tracker.stacked("1.bias"), torch.ones(2, 1))
    # A parameter without a gradient is recorded as zeros; the state round-trips.
    model.zero_grad(set_to_none=True)
    late = GradientTracker(model, ["1.bias"], steps=[0], dtype=torch.float16)
    assert late.maybe_record(0) and torch.equal(late.stacked("1.bias"), torch.zeros(1, 1, dtype=torch.float16))
    copy = GradientTracker(model, ["0.weight", "1.bias"], steps=[1, 3])
    copy.load_state_dict(tracker.state_dict())
    assert copy.recorded_steps == [1, 3] and torch.equal(copy.stacked("0.weight"), stacked)


def test_a_chain_link_that_repeats_a_trained_dataset_is_refused(tmp_path, capsys):
    first = tmp_path / "first"
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", "--save", str(first)]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    assert main([*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "2", "--load",
                 str(first / "ToyShape.pth"), "--save", str(other)]) == 2
    err = capsys.readouterr().err
    assert "already trained ToyShape" in err and err.count("\n") == 1
    assert not other.exists()
