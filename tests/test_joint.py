"""``--method joint``: zero steps until the last task, then the sum of the tasks' steps on their union, each sample
classified among its own task's classes only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtil.datasets.toyworld import ToyTaskDataset
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.models.clip_loading import load_clip
from mtil.methods.joint import Joint, TaskMixture
from tests.helpers import load

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0", "--device", "cpu"]


@pytest.fixture
def small_toy_train(monkeypatch):
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 32)


def test_mixture_offsets_labels_into_the_union_of_classes(small_toy_train):
    parts = [ToyTaskDataset("ToySize", "train"), ToyTaskDataset("ToyColor", "train")]
    mixture = TaskMixture(parts, [3, 8])
    assert len(mixture) == 64
    assert mixture[5][1] == parts[0][5][1]
    assert mixture[32 + 5][1] == 3 + parts[1][5][1]
    assert {mixture[i][1] for i in range(32, 64)} == set(range(3, 11))


def test_joint_trains_only_at_the_last_task_for_the_whole_sequence(tmp_path, small_toy_train, monkeypatch):
    seen = []
    original = Joint.loss

    def recording(self, run, batch):
        seen.append((run.state.current_task, batch[1].clone()))
        return original(self, run, batch)

    monkeypatch.setattr(Joint, "loss", recording)
    save = tmp_path / "joint"
    assert main([*FAST, "--method", "joint", "--train-dataset", "ToySize,ToyColor", "--iterations", "3",
                 "--save", str(save)]) == 0
    assert [task for task, _ in seen] == ["ToyColor"] * 6  # 3 + 3 steps, all at the last task
    labels = torch.cat([labels for _, labels in seen])
    assert labels.min() < 3 <= labels.max()  # batches mix both tasks (union labels 0-2 size, 3-10 colour)
    wide = mx.to_wide(mx.read_matrix(save / "accuracy_matrix.csv"), ["ToySize", "ToyColor"])
    assert wide.loc[1].tolist() == wide.loc[0].tolist()  # nothing trained before the last task
    untrained = load_clip("micro-vit", seed=0).model.state_dict()
    after_first, after_last = load(save / "ToySize.pth")["model"], load(save / "ToyColor.pth")["model"]
    assert all(torch.equal(after_first[k], v) for k, v in untrained.items())
    assert not all(torch.equal(after_last[k], v) for k, v in untrained.items())
    assert load(save / "latest.pth")["state"]["global_step"] == 6


def test_each_sample_competes_only_with_its_own_tasks_classes():
    """The loss equals the mean of per-sample cross-entropies over the sample's own task's columns."""
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    task_of_class = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    labels = torch.tensor([0, 2, 3, 6, 1])
    expected = torch.stack([
        F.cross_entropy(logits[i, :3][None], labels[i:i + 1]) if labels[i] < 3 else
        F.cross_entropy(logits[i, 3:][None], labels[i:i + 1] - 3) for i in range(5)]).mean()

    class Model(torch.nn.Module):
        logit_scale = torch.nn.Parameter(torch.zeros(()))

    method = Joint.__new__(Joint)
    method._task_of_class = task_of_class
    method._tokens = None

    class Run:
        device = torch.device("cpu")
        model = Model()

        class config:
            train_mode = "whole"
            ls = 0.0

    monkey = pytest.MonkeyPatch()
    monkey.setattr("mtil.methods.joint.image_features", lambda model, images, with_grad: images)
    Run.model.encode_text = lambda tokens: torch.eye(7)
    try:
        got = method.loss(Run, (logits, labels))["ce"]
    finally:
        monkey.undo()
    assert torch.allclose(got, expected)
