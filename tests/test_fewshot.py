"""The few-shot protocol: K shots per class drawn reproducibly from labels alone, a disjoint validation split of
min(K, 4) per class, base-to-new halves with HM, the flags' checks, and a tiny run end to end."""
from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st
from torch.utils.data import Dataset

from mtil.args import parse_args
from mtil.datasets.base import TaskData
from mtil.datasets.fewshot import FewShot, draw_shots, harmonic_mean, split_classes, view
from mtil.errors import UserError
from mtil.main import main


class LabelsOnly(Dataset):
    """A split whose images must never be decoded to draw the shots: reading one fails the test."""

    def __init__(self, targets: list[int]):
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        raise AssertionError("an image was decoded to draw the shots")


def task(train: list[int], test: list[int] | None = None, classes: int | None = None) -> TaskData:
    count = classes or max(train) + 1
    test = list(range(count)) * 2 if test is None else test
    return TaskData("Fake", [f"class{c}" for c in range(count)], ["a photo of a {}."],
                    {"train": lambda: LabelsOnly(train), "test": lambda: LabelsOnly(test)})


def labels_of(data: TaskData, split: str) -> list[int]:
    return data.targets(split)


TRAIN = [i % 5 for i in range(5 * 30)]  # 5 classes, 30 images each, interleaved


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_exactly_k_per_class_and_a_disjoint_validation_of_min_k_4(shots):
    data = view(task(TRAIN), FewShot(shots, seed=1), "all")
    train, val = data.raw("train"), data.raw("val")
    assert Counter(labels_of(data, "train")) == {c: shots for c in range(5)}
    assert Counter(labels_of(data, "val")) == {c: min(shots, 4) for c in range(5)}
    assert not set(train.indices) & set(val.indices)
    assert all(TRAIN[i] == label for i, label in zip(train.indices, train.targets))  # labels follow the images


def test_the_draw_is_reproducible_by_seed_and_differs_across_seeds():
    def drawn(seed):
        return draw_shots(TRAIN, 4, seed, range(5), 4)

    assert drawn(1) == drawn(1)
    assert view(task(TRAIN), FewShot(4, 1), "all").raw("train").indices == drawn(1)[0]
    assert len({tuple(drawn(s)[0]) for s in (1, 2, 3)}) == 3
    assert drawn(1)[1] != drawn(2)[1]


def test_a_class_is_drawn_alike_whatever_other_classes_are_drawn():
    """Base classes get the same shots with or without --base-new (each class's draw is seeded by itself)."""
    everything = view(task(TRAIN), FewShot(2, 3), "all").raw("train")
    base = view(task(TRAIN), FewShot(2, 3, base_new=True), "base").raw("train")
    assert base.indices == [i for i in everything.indices if TRAIN[i] in (0, 1, 2)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=120), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_draws_are_balanced_and_disjoint_for_any_labels(labels, shots, seed):
    classes = sorted(set(labels))
    val_shots = min(shots, 4)
    if min(labels.count(c) for c in classes) < shots + val_shots:
        with pytest.raises(UserError):
            draw_shots(labels, shots, seed, classes, val_shots)
        return
    train, val = draw_shots(labels, shots, seed, classes, val_shots)
    assert Counter(labels[i] for i in train) == {c: shots for c in classes}
    assert Counter(labels[i] for i in val) == {c: val_shots for c in classes}
    assert not set(train) & set(val) and len(set(train)) == len(train)


def test_too_few_images_is_one_line_naming_the_classes():
    labels = [0] * 10 + [1] * 3 + [2] * 10
    data = view(task(labels), FewShot(2), "all")
    with pytest.raises(UserError) as caught:
        data.raw("train")
    message = str(caught.value)
    assert "\n" not in message and "class1 (3)" in message and "class0" not in message
    assert "--shots 1 or less" in message  # 1 shot + 1 validation fits in 3 images


def test_base_new_splits_the_classes_in_halves_first_half_base():
    assert split_classes(10) == (list(range(5)), list(range(5, 10)))
    assert split_classes(5) == ([0, 1, 2], [3, 4])  # CoOp: ceil(n / 2) base classes
    test = [c for c in range(5) for _ in range(3)]
    base = view(task(TRAIN, test), FewShot(2, base_new=True), "base")
    new = view(task(TRAIN, test), FewShot(2, base_new=True), "new")
    assert base.classnames == ["class0", "class1", "class2"] and new.classnames == ["class3", "class4"]
    assert Counter(base.targets("train")) == {0: 2, 1: 2, 2: 2}  # trains on base classes only
    assert Counter(base.targets("test")) == {0: 3, 1: 3, 2: 3}
    assert Counter(new.targets("test")) == {0: 3, 1: 3}  # new classes renumbered from 0, among their own prompts
    assert [test[i] for i in new.raw("test").indices] == [3] * 3 + [4] * 3


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(60.0, 80.0) == harmonic_mean(80.0, 60.0)
    assert harmonic_mean(50.0, 50.0) == 50.0 and harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(90.0, 10.0) < (90 + 10) / 2  # punishes the weak side


def test_without_shots_base_new_trains_on_every_base_image_and_has_no_validation():
    data = view(task(TRAIN), FewShot(None, base_new=True), "base")
    assert Counter(data.targets("train")) == {0: 30, 1: 30, 2: 30}
    assert "val" not in data.openers


TOY = ["--model", "micro-vit", "--device", "cpu", "--workers", "0"]


@pytest.mark.parametrize("argv, expected", [
    (["--train-dataset", "ToyColorA", "--iterations", "1", "--fewshot-seed", "2"], "--fewshot-seed"),
    (["--train-dataset", "ToyColorA", "--iterations", "1", "--base-new", "--train-mode", "fc"], "linear head"),
    (["--eval-only", "--shots", "4"], "--shots"),
    (["--eval-only", "--base-new"], "--method zeroshot"),
    (["--train-dataset", "ToyColorA", "--iterations", "1", "--seeds", "1,2"], "--save"),
    (["--train-dataset", "ToyColorA", "--iterations", "1", "--seeds", "1,2", "--seed", "3", "--save", "x"],
     "drop --seed"),
    (["--train-dataset", "ToyColorA", "--iterations", "1", "--seeds", "1,1", "--save", "x"], "twice"),
    (["--method", "contrastive", "--train-dataset", "ToyCaptions", "--iterations", "1", "--shots", "2"],
     "captions"),
])
def test_few_shot_flags_that_cannot_work_are_one_line_errors(argv, expected):
    with pytest.raises(UserError, match=expected) as caught:
        parse_args([*TOY, *argv])
    assert "\n" not in str(caught.value)


def test_a_few_shot_base_to_new_run_trains_on_k_base_shots_and_reports_base_new_hm(tmp_path, capsys):
    """ToyColorA (4 classes): 2 shots x 2 base classes = 4 training images, so one epoch of batch 1 is 4 steps."""
    save = tmp_path / "run"
    assert main([*TOY, "--train-dataset", "ToyColorA", "--shots", "2", "--fewshot-seed", "3", "--base-new",
                 "--epochs", "1", "--batch-size", "1", "--warmup-length", "1", "--max-evaluation-size", "8",
                 "--log-every", "0", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["after_task"] == 1] == [4]
    assert records[-1]["part"] == "base" and records[-1]["classes"] == 2  # ranked among the 2 base classes
    with (save / "fewshot.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    final = {(r["split"], r["classes"]): r for r in rows if r["after_task"] == "1"}
    assert set(final) == {("test", "base"), ("test", "new"), ("val", "base")}
    assert final[("val", "base")]["images"] == "4"  # min(2, 4) validation images x 2 base classes
    base, new = float(final[("test", "base")]["top1"]), float(final[("test", "new")]["top1"])
    assert f"HM {harmonic_mean(base, new):.2f}" in out and "| ToyColorA |" in out
