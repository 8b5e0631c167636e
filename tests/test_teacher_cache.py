"""The frozen teacher's reference-image features, kept per reference image (``--ref-feature-cache``, on by
default for reference sets up to 100 000 images): the teacher's image forward runs once per image while the teacher and the reference data stay the same,
the training is the uncached one's up to float rounding, and a resumed run continues with the same rows."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from clip.model import CLIP

from mtil.datasets.toyworld import ToyCaptionDataset, ToyTaskDataset
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods.distillation import TeacherImageFeatures
from mtil.methods.reference_distillation import ReferenceDistillation
from tests.helpers import load, run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0", "--device", "cpu",
        "--train-dataset", "ToyShape,ToyColor", "--iterations", "6", "--eval-datasets", "ToyShape"]
ZSCL = ["--method", "ZSCL", "--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions",
        "--ref-sentences-count", "50"]
REFERENCE_IMAGES = 12  # 2 tasks x 6 steps x 8 = 96 reference draws over 12 images


@pytest.fixture
def teacher_encodings(monkeypatch):
    """Small data, and every teacher image forward recorded as (method, task index, images encoded)."""
    monkeypatch.setitem(ToyCaptionDataset.default_sizes, "train", REFERENCE_IMAGES)
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 24)
    records: list[tuple] = []
    methods: list[ReferenceDistillation] = []
    original_before_task, original_encode = ReferenceDistillation.before_task, CLIP.encode_image

    def before_task(self, run, task):
        if self not in methods:
            methods.append(self)
        self._task_index = run.state.task_index
        return original_before_task(self, run, task)

    def encode_image(self, images):
        for method in methods:
            if self is method.teacher:
                records.append((method, method._task_index, len(images)))
                break
        return original_encode(self, images)

    monkeypatch.setattr(ReferenceDistillation, "before_task", before_task)
    monkeypatch.setattr(CLIP, "encode_image", encode_image)
    return records


def test_zscl_teacher_encodes_each_reference_image_once_per_sequence(tmp_path, teacher_encodings):
    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    assert main([*FAST, *ZSCL, "--save", str(cached)]) == 0
    method = teacher_encodings[0][0]
    assert sum(n for _, _, n in teacher_encodings) == REFERENCE_IMAGES  # not 96: once per image, both tasks
    assert len(method.teacher_images) == REFERENCE_IMAGES and method.teacher_images.encoded == REFERENCE_IMAGES
    teacher_encodings.clear()
    assert main([*FAST, *ZSCL, "--ref-feature-cache", "off", "--save", str(uncached)]) == 0
    assert sum(n for _, _, n in teacher_encodings) == 2 * 6 * 8  # every draw
    # The same training up to float rounding (a cached row was computed in another batch): the cache is exact.
    one, two = load(cached / "latest.pth")["model"], load(uncached / "latest.pth")["model"]
    start = load(cached / "ToyShape.pth")["model"]
    assert any(not torch.equal(one[k], start[k]) for k in one), "task 2 trained nothing"
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-6)


def test_a_teacher_that_changes_with_the_task_starts_an_empty_cache(tmp_path, teacher_encodings):
    """LwF's teacher is the previous task's model: its cached rows die with it, and each task's teacher encodes
    each of that task's training images once (24 per task, drawn 48 times)."""
    assert main([*FAST, "--method", "lwf", "--save", str(tmp_path / "lwf")]) == 0
    teachers = {}
    for method, task_index, n in teacher_encodings:
        teachers[task_index] = teachers.get(task_index, 0) + n
    assert teachers == {0: 24, 1: 24}


def test_resumed_runs_continue_with_the_same_cached_rows(tmp_path, monkeypatch, teacher_encodings):
    """Killed mid-task 2 (last checkpoint at step 4) and at its step 1 (last checkpoint: the end of task 1): both
    resumes end bit-identical to the uninterrupted run, and the rows came back from the checkpoint (the teacher
    encodes no image twice)."""
    argv = [*FAST, *ZSCL, "--checkpoint-interval", "2"]
    straight = tmp_path / "straight"
    assert main([*argv, "--save", str(straight)]) == 0
    for name, (completed, step) in {"mid-task": (["ToyShape"], 5), "boundary": (["ToyShape"], 1)}.items():
        save = tmp_path / name
        run_killed_at(monkeypatch, [*argv, "--save", str(save)], completed, step)
        saved = load(save / "latest.pth")["methods"]["ZSCL"]["teacher_image_features"]
        assert saved is not None and len(saved["indices"]) > 0
        teacher_encodings.clear()
        assert main([*argv, "--save", str(save)]) == 0
        encoded = sum(n for _, _, n in teacher_encodings)
        assert encoded == REFERENCE_IMAGES - len(saved["indices"]), name
        pd.testing.assert_frame_equal(mx.read_matrix(save / "accuracy_matrix.csv"),
                                      mx.read_matrix(straight / "accuracy_matrix.csv"), check_exact=True)
        want, got = load(straight / "ToyColor.pth")["model"], load(save / "ToyColor.pth")["model"]
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs after the resume"


def test_lookup_returns_cached_rows_and_encodes_only_the_missing():
    cache = TeacherImageFeatures()
    calls = []

    class Teacher:
        def encode_image(self, images):
            calls.append(images.clone())
            return images * 2

    images = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]])
    first = cache.lookup(Teacher(), images[:2], [7, 9])
    cache.remember([7, 9], first)
    later = torch.tensor([[9.0, 9.0], [1.0, 0.0], [9.0, 9.0], [1.0, 0.0]])
    mixed = cache.lookup(Teacher(), later, [9, 4, 7, 4])  # 9 and 7 cached; 4 new, drawn twice: encoded once
    assert torch.equal(calls[-1], later[1:2])
    assert torch.allclose(mixed, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]]))
    assert cache.encoded == 3
    cache.remember([9, 4, 7, 4], mixed * 0 + 5)  # only 4 is new: 9 and 7 keep their first rows
    assert torch.equal(cache.rows[9], first[1]) and torch.equal(cache.rows[4], torch.full((2,), 5.0))
    state = cache.state_dict()
    assert state["indices"].tolist() == [4, 7, 9]
    restored = TeacherImageFeatures()
    restored.load_state_dict(state, torch.device("cpu"))
    assert all(torch.equal(restored.rows[i], cache.rows[i]) for i in (4, 7, 9))
