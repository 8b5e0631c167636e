"""Evaluation: balanced sampling, metric files, and the zero-shot evaluator's head cache and accuracy."""
from __future__ import annotations

import csv
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from mtil.datasets.registry import open_dataset
from mtil.evaluation.metrics_io import METRIC_COLUMNS, metrics_path, read_metrics, safe_name, write_metric_row
from mtil.evaluation.sampling import balanced_sample
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.models.text import zeroshot_head
from mtil.models.transforms import eval_transform


# --------------------------------------------------------------------------- #
# balanced_sample
# --------------------------------------------------------------------------- #
def _class_ordered(counts: list[int]) -> list[int]:
    """Targets sorted by class, as a class-ordered folder dataset gives them."""
    return [label for label, n in enumerate(counts) for _ in range(n)]


@pytest.mark.parametrize("max_size", [1, 7, 10, 33, 60])
def test_balanced_sample_size_uniqueness_and_balance(max_size):
    targets = _class_ordered([20, 20, 20, 20, 20])
    chosen = balanced_sample(targets, max_size, seed=0)
    assert len(chosen) == max_size
    assert len(set(chosen)) == max_size
    assert chosen == sorted(chosen)
    assert all(0 <= i < len(targets) for i in chosen)
    per_class = Counter(targets[i] for i in chosen)
    counts = [per_class.get(c, 0) for c in range(5)]
    assert max(counts) - min(counts) <= 1, counts


def test_balanced_sample_does_not_take_the_first_items():
    targets = _class_ordered([50, 50])
    chosen = balanced_sample(targets, 10, seed=0)
    assert Counter(targets[i] for i in chosen) == {0: 5, 1: 5}
    assert chosen != list(range(5)) + list(range(50, 55))


def test_balanced_sample_interleaved_labels():
    targets = [i % 4 for i in range(400)]
    chosen = balanced_sample(targets, 40, seed=3)
    assert Counter(targets[i] for i in chosen) == {c: 10 for c in range(4)}


def test_balanced_sample_is_deterministic_per_seed():
    targets = _class_ordered([30, 25, 40])
    assert balanced_sample(targets, 20, seed=5) == balanced_sample(targets, 20, seed=5)
    others = {tuple(balanced_sample(targets, 20, seed=s)) for s in range(6)}
    assert len(others) > 1  # the seed matters


def test_balanced_sample_small_classes_give_all_they_have():
    targets = _class_ordered([2, 50, 50, 3])
    chosen = balanced_sample(targets, 40, seed=1)
    assert len(chosen) == 40 and len(set(chosen)) == 40
    per_class = Counter(targets[i] for i in chosen)
    assert per_class[0] == 2 and per_class[3] == 3  # everything the small classes have
    assert abs(per_class[1] - per_class[2]) <= 1  # the rest shared evenly
    assert per_class[1] + per_class[2] == 35


def test_balanced_sample_budget_larger_than_data():
    targets = _class_ordered([3, 4])
    assert balanced_sample(targets, 7) == list(range(7))
    assert balanced_sample(targets, 100) == list(range(7))


# --------------------------------------------------------------------------- #
# metric files
# --------------------------------------------------------------------------- #
def _csv_rows(path):
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_write_metric_row_appends_and_replaces(tmp_path):
    path = write_metric_row(tmp_path, "DTD", 0, 41.5, 80.25)
    assert path == metrics_path(tmp_path, "DTD") and path.name == "metrics_DTD.csv"
    write_metric_row(tmp_path, "DTD", 1000, 55.0, 90.0)
    assert read_metrics(path) == {0: (41.5, 80.25), 1000: (55.0, 90.0)}
    write_metric_row(tmp_path, "DTD", 500, 50.0, 85.0)
    write_metric_row(tmp_path, "DTD", 1000, 56.125, 91.5)  # re-evaluation of an iteration replaces its row
    assert read_metrics(path) == {0: (41.5, 80.25), 500: (50.0, 85.0), 1000: (56.125, 91.5)}

    rows = _csv_rows(path)
    assert rows[0] == list(METRIC_COLUMNS) == ["iteration", "top1", "top5"]
    assert all(len(row) == 3 for row in rows)
    iterations = [int(row[0]) for row in rows[1:]]
    assert iterations == sorted(set(iterations)) == [0, 500, 1000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics_DTD.csv"]  # no temporary files left


def test_metric_files_per_dataset_and_safe_names(tmp_path):
    write_metric_row(tmp_path / "run", "ImageFolder:/x/my set", 3, 1.0, 2.0)
    write_metric_row(tmp_path / "run", "ToyShape", 3, 10.0, 20.0)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["metrics_ToyShape.csv", "metrics_my_set.csv"]  # a folder by its own name (issue 25)
    assert safe_name("ImageFolder:/x/my set") == "my_set"
    assert read_metrics(tmp_path / "run" / "metrics_ToyShape.csv") == {3: (10.0, 20.0)}
    assert read_metrics(tmp_path / "absent.csv") == {}


# --------------------------------------------------------------------------- #
# ZeroShotEvaluator
# --------------------------------------------------------------------------- #
def _evaluator(model, max_size=40):
    return ZeroShotEvaluator(model, workers=0, batch_size=16, max_size=max_size, seed=0)


def test_heads_are_built_once_per_model_state(micro):
    evaluator = _evaluator(micro.model, max_size=12)
    first = evaluator.evaluate("ToyShape")
    assert evaluator.heads_built == 1
    assert evaluator.evaluate("ToyShape") == first
    assert evaluator.heads_built == 1
    evaluator.evaluate("ToyColor")
    assert evaluator.heads_built == 2
    evaluator.evaluate("ToyShape")
    evaluator.evaluate("ToyColor")
    assert evaluator.heads_built == 2

    kept = evaluator.head("ToyShape")
    evaluator.model_changed(text_changed=False)
    assert evaluator.head("ToyShape") is kept
    evaluator.evaluate("ToyShape")
    assert evaluator.heads_built == 2

    with torch.no_grad():
        micro.model.token_embedding.weight.add_(torch.randn_like(micro.model.token_embedding.weight))
    evaluator.model_changed()
    evaluator.evaluate("ToyShape")
    assert evaluator.heads_built == 3
    rebuilt = evaluator.head("ToyShape")
    assert not torch.allclose(rebuilt.weight, kept.weight)  # the new head reflects the new text encoder
    evaluator.evaluate("ToyColor")
    assert evaluator.heads_built == 4


def test_evaluate_keeps_the_training_flag(micro):
    evaluator = _evaluator(micro.model, max_size=8)
    micro.model.train()
    evaluator.evaluate("ToySize")
    assert micro.model.training
    micro.model.eval()
    evaluator.evaluate("ToySize")
    assert not micro.model.training


def test_top1_and_top5_match_brute_force(micro):
    model = micro.model
    evaluator = _evaluator(model, max_size=40)
    result = evaluator.evaluate("ToyShape")

    task = open_dataset("ToyShape")
    indices = balanced_sample(task.targets("test"), 40, seed=0)
    head = zeroshot_head(model, task.classnames, task.templates)
    transform = eval_transform(model.visual.input_resolution)
    raw = task.raw("test")
    hits1 = hits5 = near_ties = 0
    with torch.no_grad():
        for index in indices:
            image, label = raw[index]
            feature = F.normalize(model.encode_image(transform(image).unsqueeze(0)), dim=-1)
            logits = (feature @ head)[0]
            order = logits.argsort(descending=True).tolist()
            hits1 += order[0] == label
            hits5 += label in order[:5]
            ranked = logits.sort(descending=True).values
            near_ties += bool((ranked[:5] - ranked[1:6]).abs().min() < 1e-5)
    assert result.dataset == "ToyShape"
    assert result.count == len(indices) == 40
    tolerance = 100.0 * near_ties / 40  # batched and one-at-a-time matmuls may differ in the last bits
    assert abs(result.top1 - 100.0 * hits1 / 40) <= tolerance
    assert abs(result.top5 - 100.0 * hits5 / 40) <= tolerance
    assert result.top1 <= result.top5


def test_evaluates_everything_without_max_size(micro):
    task = open_dataset("ToyBackground")
    evaluator = ZeroShotEvaluator(micro.model, workers=0, batch_size=64, max_size=None)
    assert len(evaluator.loader("ToyBackground").dataset) == len(task.raw("test"))
    assert len(_evaluator(micro.model, max_size=9).loader("ToyBackground").dataset) == 9
