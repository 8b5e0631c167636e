"""Training methods: the distillation loss, ZSCL / LwF / LwF-VR / iCaRL on toy data, iCaRL's memory, refused flag
combinations, and exact resume of a run with stateful components (LwF teacher, L2 anchor, weight ensemble).

Runs are in-process ``main([...])`` calls on ``micro-vit`` with a few steps each; what a method computes inside a
run is observed by wrapping its hooks with ``monkeypatch`` (the wrappers call the original and record).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP

from mtil.datasets.registry import open_dataset
from mtil.datasets.toyworld import ToyTaskDataset
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods.distillation import SentenceFeatures, distill
from mtil.methods.icarl import ICaRL, herding
from mtil.methods.reference_distillation import ZSCL, ReferenceDistillation
from tests.helpers import load, run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0", "--device", "cpu"]
ZSCL_TOY = ["--method", "ZSCL", "--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions",
            "--ref-sentences-count", "200"]
DISTILL_TERMS = {"distill_image", "distill_text", "feature_mse", "distill_image_image"}


@pytest.fixture
def small_toy_train(monkeypatch):
    """64 training images per toy task (iCaRL encodes the whole training set at each task's end)."""
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 64)


# ------------------------------------------------------------------------------------------------ distill


def soft_cross_entropy(teacher: torch.Tensor, student: torch.Tensor, T: float) -> torch.Tensor:
    """``CE(student / T, softmax(teacher / T)) * T^2``, mean over rows: the textbook form of the loss."""
    return F.cross_entropy(student / T, F.softmax(teacher / T, dim=-1)) * T * T


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_distill_is_zero_iff_equal_and_has_the_soft_cross_entropy_gradient(T):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 7, generator=generator) * 3
    assert abs(distill(teacher, teacher.clone(), T).item()) < 1e-6
    assert abs(distill(teacher * 2, teacher * 2, T).item()) < 1e-6
    # A shift of every logit of a row changes no probability: still zero.
    assert abs(distill(teacher, teacher + 4.0, T).item()) < 1e-6
    for student in (teacher + 0.1 * torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator),
                    teacher.flip(-1)):
        assert distill(teacher, student, T).item() > 1e-6

    # Gradients with respect to the student equal those of the soft-target cross-entropy (the two differ by the
    # teacher's entropy, a constant), at random points and at the minimum (both zero there).
    for student in (torch.randn(5, 7, generator=generator), teacher.clone()):
        a = student.clone().requires_grad_(True)
        b = student.clone().requires_grad_(True)
        distill(teacher, a, T).backward()
        soft_cross_entropy(teacher, b, T).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_distill_value_is_cross_entropy_minus_teacher_entropy():
    generator = torch.Generator().manual_seed(1)
    teacher, student, T = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator), 2.0
    p = F.softmax(teacher / T, dim=-1)
    entropy = -(p * p.log()).sum(-1).mean() * T * T
    assert distill(teacher, student, T).item() == pytest.approx((soft_cross_entropy(teacher, student, T)
                                                                 - entropy).item(), abs=1e-5)


# ------------------------------------------------------------------------------------------------ distillation runs


@pytest.fixture
def recorded_losses(monkeypatch):
    """Every ReferenceDistillation.loss call of the runs in the test: (method, task index, step, {term: value})."""
    records: list[tuple] = []
    original = ReferenceDistillation.loss

    def loss(self, run, batch):
        terms = original(self, run, batch)
        records.append((self, run.state.task_index, run.state.step, {k: v.item() for k, v in terms.items()}))
        return terms

    monkeypatch.setattr(ReferenceDistillation, "loss", loss)
    return records


def terms_at(records, task_index: int, step: int) -> dict[str, float]:
    [terms] = [t for _, i, s, t in records if i == task_index and s == step]
    return {k: v for k, v in terms.items() if k in DISTILL_TERMS}


@pytest.mark.parametrize("method, extra, teacher_is_student_at", [
    # ZSCL: teacher = zero-shot model = the model at the start of task 1 (and only there).
    ("ZSCL", [*ZSCL_TOY, "--feature-mse", "--image-image-loss"], [0]),
    # LwF, LwF-VR: teacher = the model at the start of each task.
    ("lwf", ["--method", "lwf", "--feature-mse"], [0, 1]),
    ("lwf-vr", ["--method", "lwf-vr", "--ref-sentences-count", "100"], [0, 1]),
    # iCaRL: no exemplars in task 1 (no distillation); task 2's teacher = the model at its start.
    ("icarl", ["--method", "icarl", "--memory-size", "16", "--image-image-loss"], [1]),
])
def test_distillation_terms_vanish_while_student_is_teacher(method, extra, teacher_is_student_at, recorded_losses,
                                                            small_toy_train):
    assert main([*FAST, *extra, "--train-dataset", "ToyShape,ToyColor", "--iterations", "3",
                 "--eval-datasets", "ToyShape"]) == 0
    assert {r[0].name for r in recorded_losses} == {method}
    assert [(i, s) for _, i, s, _ in recorded_losses] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    wanted = {"distill_image", "distill_text"} | {t for t, flag in (("feature_mse", "--feature-mse"),
                                                                    ("distill_image_image", "--image-image-loss"))
                                                  if flag in extra}
    for task_index in (0, 1):
        if method == "icarl" and task_index == 0:
            assert terms_at(recorded_losses, 0, 0) == {} and terms_at(recorded_losses, 0, 2) == {}
            continue
        first, later = terms_at(recorded_losses, task_index, 0), terms_at(recorded_losses, task_index, 2)
        assert set(first) == set(later) == wanted
        if task_index in teacher_is_student_at:
            assert all(abs(v) < 1e-6 for v in first.values()), (task_index, first)
        else:  # ZSCL's second task: the student has moved away from the zero-shot teacher
            assert all(v > 1e-7 for v in first.values()), (task_index, first)
        assert all(v > 1e-7 for v in later.values()), (task_index, later)


@pytest.mark.parametrize("ref_wise", [False, True])
def test_zscl_teacher_sentence_features_are_computed_once_per_teacher(monkeypatch, recorded_losses, ref_wise):
    """2 tasks x 4 steps: the zero-shot teacher is built and encodes the reference sentences once per sequence;
    a --ref-wise teacher (a blend with the current model) once per task."""
    computations = []
    original_compute = SentenceFeatures.compute

    def compute(self, teacher, sentences, context_length):
        computations.append(teacher)
        return original_compute(self, teacher, sentences, context_length)

    teachers: list[CLIP] = []
    original_make_teacher = ZSCL.make_teacher

    def make_teacher(self, run, task):
        teacher = original_make_teacher(self, run, task)
        teachers.append(teacher)
        return teacher

    text_calls = []
    original_encode_text = CLIP.encode_text

    def encode_text(self, text):
        text_calls.append((self, len(text)))
        return original_encode_text(self, text)

    monkeypatch.setattr(SentenceFeatures, "compute", compute)
    monkeypatch.setattr(ZSCL, "make_teacher", make_teacher)
    monkeypatch.setattr(CLIP, "encode_text", encode_text)
    assert main([*FAST, *ZSCL_TOY, "--train-dataset", "ToyShape,ToyColor", "--iterations", "4",
                 "--eval-datasets", "ToyShape", *(["--ref-wise"] if ref_wise else [])]) == 0
    teachers_built = 2 if ref_wise else 1
    method = recorded_losses[0][0]
    assert len(recorded_losses) == 8 and all(r[0] is method for r in recorded_losses)
    assert method.teacher_text.computations == teachers_built
    assert len(teachers) == teachers_built and [id(t) for t in computations] == [id(t) for t in teachers]
    # The teachers' text encoder ran only for those computations (200 sentences fit one batch each), and
    # no model encoded the reference sentences at any step.
    teacher_calls = [n for model, n in text_calls if any(model is t for t in teachers)]
    assert teacher_calls == [200] * teachers_built
    assert sum(1 for _, n in text_calls if n == 200) == teachers_built


# ------------------------------------------------------------------------------------------------ iCaRL


def test_herding_picks_the_item_nearest_the_mean_first_and_is_deterministic():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(40, 8, generator=generator)
    normalised = F.normalize(features, dim=-1)
    nearest = int((normalised - normalised.mean(0)).norm(dim=1).argmin())
    picks = herding(features, 10)
    assert picks[0] == nearest
    assert len(picks) == len(set(picks)) == 10 and all(isinstance(i, int) for i in picks)
    assert herding(features.clone(), 10) == picks
    assert herding(features, 4) == picks[:4]  # greedy: a smaller budget is a prefix
    assert sorted(herding(features, 100)) == list(range(40))  # never more than there are
    # Each pick keeps the running mean closest to the target (checked by brute force for the second pick).
    second = min((i for i in range(40) if i != nearest),
                 key=lambda i: ((normalised[nearest] + normalised[i]) / 2 - normalised.mean(0)).norm().item())
    assert picks[1] == second
    # Moving one item onto the mean makes it the first pick.
    moved = features.clone()
    moved[17] = normalised.mean(0) * 5
    assert herding(moved, 1) == [17]


def run_icarl(save: Path, monkeypatch, budget: int) -> list[dict[str, list[int]]]:
    """A 3-task iCaRL run; the memory after each task's end."""
    memories: list[dict[str, list[int]]] = []
    original = ICaRL.after_task

    def after_task(self, run, task):
        original(self, run, task)
        memories.append(copy.deepcopy(self.memory))

    with monkeypatch.context() as m:
        m.setattr(ICaRL, "after_task", after_task)
        assert main([*FAST, "--method", "icarl", "--memory-size", str(budget), "--train-dataset",
                     "ToyShape,ToyColor,ToyPattern", "--iterations", "2", "--eval-datasets", "ToyShape",
                     "--save", str(save)]) == 0
    return memories


def test_icarl_memory_stays_within_budget_and_shrinks_evenly(tmp_path, monkeypatch, small_toy_train):
    budget = 25  # not divisible by 2 or 3
    memories = run_icarl(tmp_path / "a", monkeypatch, budget)
    tasks = ["ToyShape", "ToyColor", "ToyPattern"]
    assert [list(m) for m in memories] == [tasks[:1], tasks[:2], tasks[:3]]
    for n, memory in enumerate(memories, 1):
        assert sum(len(v) for v in memory.values()) <= budget
        assert {len(v) for v in memory.values()} == {budget // n}  # every task the same share
        for name, indices in memory.items():
            assert all(type(i) is int for i in indices)
            assert len(set(indices)) == len(indices)
            targets = open_dataset(name, "data").targets("train")
            assert all(0 <= i < len(targets) for i in indices)
            counts = pd.Series([targets[i] for i in indices]).value_counts()
            assert counts.max() - counts.min() <= 1, (name, counts.to_dict())  # classes stay balanced
    # Old shares shrink by truncation: the best (first-herded) exemplars stay.
    for earlier, later in zip(memories, memories[1:]):
        for name, indices in later.items():
            if name in earlier:
                assert indices == earlier[name][:len(indices)]
    # The checkpoint carries the memory as plain int lists.
    saved = load(tmp_path / "a" / "latest.pth")["methods"]["icarl"]["memory"]
    assert saved == memories[-1]

    # Seeded: the same run again herds the same exemplars.
    assert run_icarl(tmp_path / "b", monkeypatch, budget) == memories


# ------------------------------------------------------------------------------------------------ refused flags


@pytest.mark.parametrize("flags, words", [
    (["--we-wise"], ["--we-wise", "--we"]),
    (["--we", "--ema", "0.99"], ["--we", "--ema"]),
    (["--train-mode", "fc", "--method", "ZSCL", *ZSCL_TOY[2:]], ["--train-mode fc"]),
    (["--eval-only", "--wise-ft"], ["--wise-ft", "--load"]),
    ([*ZSCL_TOY[:4], "--ref-sentences", "bogus"], ["--ref-sentences", "bogus"]),
    ([*ZSCL_TOY[:4], "--ref-sentences", "dataset:"], ["--ref-sentences", "dataset:"]),
])
def test_invalid_combinations_are_refused_with_one_line(flags, words, tmp_path, capsys):
    save = tmp_path / "run"
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", *flags, "--save", str(save)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("mtil: error:") and captured.err.count("\n") == 1, captured.err
    for word in words:
        assert word in captured.err
    # Refused before anything ran: no zero-shot row, no latest.pth that would make the corrected command a
    # "different settings" refusal.
    assert not save.exists() or not any(save.iterdir())
    assert "[zero-shot]" not in captured.out


# ------------------------------------------------------------------------------------------------ resume


STATEFUL = [*FAST, "--method", "lwf", "--l2", "0.1", "--we", "--avg-freq", "2", "--train-dataset",
            "ToyShape,ToyColor", "--iterations", "6", "--checkpoint-interval", "2", "--eval-datasets",
            "ToyShape,ToyColor"]


def test_stateful_method_resumes_exactly(tmp_path, monkeypatch):
    """LwF + L2 + WE killed at step 5 of task 2 (last checkpoint: step 4) and re-run: same matrix, same
    weights as the uninterrupted run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*STATEFUL, "--save", str(straight)]) == 0

    run_killed_at(monkeypatch, [*STATEFUL, "--save", str(killed)], ["ToyShape"], 5)
    latest = load(killed / "latest.pth")
    assert latest["state"]["completed"] == ["ToyShape"] and latest["state"]["step"] == 4
    methods = latest["methods"]
    assert set(methods) == {"lwf", "l2", "we"}
    assert methods["we"]["count"] == 3  # start + steps 2 and 4
    # L2's anchor is the run's one task-start copy, saved once beside the components' states (mtil.engine.task_start)
    assert methods["lwf"]["teacher"] is not None and latest["task_start"] is not None
    assert "anchor" not in methods["l2"] and "start" not in methods["we"]
    # The teacher and the anchor are the task-2 start weights (= ToyShape.pth), not the step-4 weights.
    start = load(killed / "ToyShape.pth")["model"]
    for name in ("visual.conv1.weight", "token_embedding.weight"):
        assert torch.equal(methods["lwf"]["teacher"][name], start[name])
        assert torch.equal(latest["task_start"][name], start[name])
        assert not torch.equal(latest["model"][name], start[name])

    assert main([*STATEFUL, "--save", str(killed)]) == 0
    pd.testing.assert_frame_equal(mx.read_matrix(killed / "accuracy_matrix.csv"),
                                  mx.read_matrix(straight / "accuracy_matrix.csv"), check_exact=True)
    for name in ("ToyShape.pth", "ToyColor.pth"):
        want, got = load(straight / name)["model"], load(killed / name)["model"]
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs after the resume"
    # The runs trained: task 2 moved the weights.
    assert not torch.equal(load(straight / "ToyColor.pth")["model"]["visual.conv1.weight"],
                           load(straight / "ToyShape.pth")["model"]["visual.conv1.weight"])


@pytest.mark.parametrize("method", ["lwf", "lwf-vr", "ZSCL", "icarl"])
def test_distillation_refuses_text_mode(method, capsys):
    """Distillation compares student image features with the teacher's sentence features (as the original ZSCL
    does), so with only the text encoder training it would be a silent no-op: refused in one line."""
    assert main([*FAST, "--method", method, "--train-mode", "text", "--train-dataset", "ToyShape",
                 "--iterations", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-mode text" in err[0]


def test_distillation_acts_in_image_mode(recorded_losses):
    """P_s = s f_I^student(x_ref) R_t^T: once the image encoder moved, the terms are positive in image mode."""
    assert main([*FAST, "--method", "lwf", "--train-mode", "image", "--train-dataset", "ToyShape",
                 "--iterations", "3", "--eval-datasets", "ToyShape"]) == 0
    later = terms_at(recorded_losses, 0, 2)
    assert later and all(v > 1e-7 for v in later.values()), later


def test_missing_reference_data_is_reported_before_anything_is_written(tmp_path, capsys):
    """ZSCL's reference images, sentences and teacher are checked up front, all in one line, so the corrected
    command is not refused later as 'a different configuration' of a half-started run."""
    save = tmp_path / "run"
    code = main([*FAST, "--method", "ZSCL", "--train-dataset", "ToyShape", "--iterations", "2",
                 "--data-location", str(tmp_path / "empty"), "--ref-model", "nope", "--save", str(save)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "ImageNet" in err[0] and "Conceptual Captions" in err[0] and "--ref-model 'nope'" in err[0]
    assert not save.exists()
