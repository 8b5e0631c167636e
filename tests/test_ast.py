"""CLIP-AST (``--method ast``): the importance score, the per-block selection (both directions and random), what
stage 2 trains, its self-consistency terms, the selection file, exact resume, ``--eval-only`` of its checkpoint,
the stage-2 flags and the refused ones.

Runs are in-process ``main([...])`` calls on ``micro-vit`` (one block per encoder) with 64 training images per
task, so stage 1 (one epoch) is 8 steps of 8 images; one run goes through the command line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mtil.datasets.toyworld import ToyTaskDataset
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods.ast import (
    CLIPAST,
    STAGE1_EPS,
    blocks_of,
    importance,
    select_at_random,
    select_by_score,
    task_seed,
)
from mtil.models.clip_loading import load_clip
from tests.helpers import load, run_killed_at

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0", "--device", "cpu"]
AST = [*FAST, "--method", "ast"]
EVAL = ["--model", "micro-vit", "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0",
        "--device", "cpu"]
SCL = ("scl_image", "scl_text", "scl_kl")


@pytest.fixture
def small_toy_train(monkeypatch):
    """64 training images per toy task: stage 1's epoch is 8 steps."""
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 64)


@pytest.fixture
def recorded(monkeypatch):
    """Every CLIPAST.loss call: (task index, step, {term: value}); and every stage 1: the task's name."""
    records: dict[str, list] = {"loss": [], "stage1": []}
    loss, stage1 = CLIPAST.loss, CLIPAST._stage1

    def recording_loss(self, run, batch):
        terms = loss(self, run, batch)
        records["loss"].append((run.state.task_index, run.state.step, {k: v.item() for k, v in terms.items()}))
        return terms

    def recording_stage1(self, run, task):
        records["stage1"].append(task.name)
        return stage1(self, run, task)

    monkeypatch.setattr(CLIPAST, "loss", recording_loss)
    monkeypatch.setattr(CLIPAST, "_stage1", recording_stage1)
    return records


def tiny_vit_blocks() -> tuple[torch.nn.Module, dict[str, list[str]]]:
    model = load_clip("tiny-vit", untrained=True, seed=0).model
    return model, blocks_of(model)


# ------------------------------------------------------------------------------------------------ importance


def test_importance_is_mean_inverse_sqrt_of_adamw_second_moment():
    model, blocks = tiny_vit_blocks()
    assert sorted(blocks) == ["text.0", "text.1", "visual.0", "visual.1"]
    assert {len(names) for names in blocks.values()} == {12}  # attn in/out w+b, ln_1, ln_2, c_fc, c_proj w+b
    params = {n: p for n, p in model.named_parameters() if any(n in names for names in blocks.values())}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3, eps=STAGE1_EPS)

    # A hand-built state: v known per tensor; one tensor left without state (never had a gradient: v = 0).
    generator = torch.Generator().manual_seed(5)
    expected = {}
    names = list(params)
    for i, name in enumerate(names[:-1]):
        v = torch.rand(params[name].shape, generator=generator) * 10.0 ** (-i % 7)
        optimizer.state[params[name]]["exp_avg_sq"] = v
        expected[name] = (1.0 / (v.double() + STAGE1_EPS).sqrt()).mean().item()
    expected[names[-1]] = STAGE1_EPS ** -0.5
    scores = importance(optimizer, params)
    assert scores.keys() == expected.keys()
    for name in expected:
        assert scores[name] == pytest.approx(expected[name], rel=1e-5), name

    # The state a real AdamW step leaves: v = (1 - beta2) g^2 after one step.
    fresh = torch.optim.AdamW(list(params.values()), lr=1e-3, eps=STAGE1_EPS)
    for param in params.values():
        param.grad = torch.randn(param.shape, generator=generator)
    fresh.step()
    for name, param in params.items():
        v = (1 - 0.999) * param.grad.double() ** 2
        assert importance(fresh, {name: param})[name] == pytest.approx(
            (1.0 / (v + STAGE1_EPS).sqrt()).mean().item(), rel=1e-5)


@pytest.mark.parametrize("k", [1, 6, 11, 12])
def test_exactly_k_tensors_per_block_in_both_directions(k):
    _, blocks = tiny_vit_blocks()
    generator = torch.Generator().manual_seed(k)
    scores = {n: float(s) for names in blocks.values() for n, s in zip(names, torch.rand(12, generator=generator))}
    high = select_by_score(blocks, scores, k, "smallest-v")
    low = select_by_score(blocks, scores, k, "largest-v")
    for chosen in (high, low):
        assert chosen.keys() == blocks.keys()
        for block, names in chosen.items():
            assert len(names) == len(set(names)) == k and set(names) <= set(blocks[block])
            assert names == [n for n in blocks[block] if n in names]  # model order
    for block, names in blocks.items():
        rest_high = [scores[n] for n in names if n not in high[block]]
        rest_low = [scores[n] for n in names if n not in low[block]]
        # smallest-v: the highest scores mean(1/sqrt(v+eps)), i.e. the smallest second moments; largest-v: the lowest.
        assert not rest_high or min(scores[n] for n in high[block]) > max(rest_high)
        assert not rest_low or max(scores[n] for n in low[block]) < min(rest_low)
        if 2 * k == len(names):
            assert set(high[block]) | set(low[block]) == set(names) and not set(high[block]) & set(low[block])


def test_ties_go_to_the_earlier_tensor_so_equal_scores_select_reproducibly():
    _, blocks = tiny_vit_blocks()
    scores = {n: 1.0 for names in blocks.values() for n in names}
    for rank in ("smallest-v", "largest-v"):
        assert select_by_score(blocks, scores, 3, rank) == {b: names[:3] for b, names in blocks.items()}


def test_random_selection_is_k_per_block_reproducible_by_its_seed():
    _, blocks = tiny_vit_blocks()
    first = select_at_random(blocks, 4, seed=7)
    assert all(len(v) == len(set(v)) == 4 and set(v) <= set(blocks[b]) for b, v in first.items())
    assert select_at_random(blocks, 4, seed=7) == first
    others = [select_at_random(blocks, 4, seed=s) for s in (8, 9)]
    assert all(other != first for other in others)
    # Blocks draw separately (not one pattern for all), and every tensor position can be drawn.
    positions = [tuple(blocks[b].index(n) for n in first[b]) for b in blocks]
    assert len(set(positions)) > 1
    # Each task of a sequence draws from the seed and its index.
    assert task_seed(42, 0) == task_seed(42, 0) != task_seed(42, 1) != task_seed(43, 1)


# ------------------------------------------------------------------------------------------------ runs


def test_stage2_trains_only_the_selection_and_its_terms_start_at_zero(tmp_path, recorded, small_toy_train):
    save = tmp_path / "run"
    assert main([*AST, "--train-dataset", "ToyShape", "--iterations", "4", "--save", str(save)]) == 0
    assert recorded["stage1"] == ["ToyShape"]

    # The selection file: K per block of each encoder, consistent with its own scores and with the checkpoint.
    record = json.loads((save / "ast_selection_ToyShape.json").read_text())
    assert record["mode"] == "importance" and record["rank"] == "smallest-v" and record["k"] == 6
    assert record["stage1_steps"] == 8  # one epoch of 64 images in batches of 8
    assert sorted(record["blocks"]) == ["text.0", "visual.0"]
    assert all(len(names) == 6 for names in record["blocks"].values())
    assert record["selected"] == [n for names in record["blocks"].values() for n in names]
    blocks = blocks_of(load_clip("micro-vit", seed=0).model)
    assert record["blocks"] == select_by_score(blocks, record["scores"], 6, "smallest-v")
    assert len(set(record["scores"].values())) > 1  # stage 1 trained: the moments differ across tensors
    checkpoint = load(save / "ToyShape.pth")
    assert checkpoint["methods"]["ast"]["selections"]["ToyShape"] == record
    assert checkpoint["methods"]["ast"]["start"] is None  # a task boundary: no stage 2 in progress

    # After stage 2 exactly the selected tensors changed (stage 1 worked on a copy; nothing else trained).
    start = load_clip("micro-vit", seed=0).model.state_dict()
    final = checkpoint["model"]
    changed = {n for n in start if not torch.equal(start[n], final[n])}
    assert changed == set(record["selected"])

    # The self-consistency terms: exactly zero at the first step (tuned = frozen), positive after steps.
    steps = [(s, terms) for _, s, terms in recorded["loss"]]
    assert [s for s, _ in steps] == [0, 1, 2, 3]
    assert set(steps[0][1]) == {"ce", *SCL}
    assert all(steps[0][1][t] == 0.0 for t in SCL), steps[0][1]
    assert all(steps[3][1][t] > 1e-7 for t in SCL), steps[3][1]


def test_lmbd_weights_scale_the_terms_and_zero_drops_one(tmp_path, recorded, small_toy_train):
    assert main([*AST, "--train-dataset", "ToyShape", "--iterations", "3", "--random-selection",
                 "--lmbd", "0", "2.5", "1"]) == 0
    assert recorded["stage1"] == []  # random selection: no stage 1
    _, _, last = recorded["loss"][-1]
    assert set(last) == {"ce", "scl_text", "scl_kl"} and last["scl_text"] > 0


def test_resume_mid_stage2_is_exact_and_does_not_repeat_stage1(tmp_path, monkeypatch, recorded, small_toy_train):
    argv = [*AST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "5", "--checkpoint-interval", "2",
            "--eval-datasets", "ToyShape,ToyColor"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*argv, "--save", str(straight)]) == 0
    assert recorded["stage1"] == ["ToyShape", "ToyColor"]

    recorded["stage1"].clear()
    run_killed_at(monkeypatch, [*argv, "--save", str(killed)], ["ToyShape"], 3, method=CLIPAST)
    assert recorded["stage1"] == ["ToyShape", "ToyColor"]
    latest = load(killed / "latest.pth")
    assert latest["state"]["step"] == 2 and latest["state"]["completed"] == ["ToyShape"]
    state = latest["methods"]["ast"]
    assert state["task"] == "ToyColor" and set(state["start"]) == set(state["selections"]["ToyColor"]["selected"])
    task_start = load(killed / "ToyShape.pth")["model"]  # the teacher's values are the task-start weights
    assert all(torch.equal(value, task_start[n]) for n, value in state["start"].items())
    assert any(not torch.equal(latest["model"][n], task_start[n]) for n in state["start"])

    recorded["stage1"].clear()
    assert main([*argv, "--save", str(killed)]) == 0
    assert recorded["stage1"] == []  # the interrupted task kept its saved selection
    pd.testing.assert_frame_equal(mx.read_matrix(killed / "accuracy_matrix.csv"),
                                  mx.read_matrix(straight / "accuracy_matrix.csv"), check_exact=True)
    for name in ("ToyShape.pth", "ToyColor.pth"):
        want, got = load(straight / name), load(killed / name)
        assert got["methods"]["ast"]["selections"] == want["methods"]["ast"]["selections"]
        for key in want["model"]:
            assert torch.equal(got["model"][key], want["model"][key]), f"{name}: {key} differs after the resume"
    for name in ("ToyShape", "ToyColor"):
        assert (killed / f"ast_selection_{name}.json").read_text() == \
            (straight / f"ast_selection_{name}.json").read_text()


def test_stage2_epochs_and_lr_set_the_length_and_learning_rate(tmp_path, monkeypatch, small_toy_train):
    seen = []
    original = CLIPAST.loss

    def loss(self, run, batch):
        seen.append((run.task.total_steps, {g.get("part"): g["initial_lr"] for g in run.task.optimizer.param_groups}))
        return original(self, run, batch)

    monkeypatch.setattr(CLIPAST, "loss", loss)
    flags = [f for f in AST if f not in ("--lr", "1e-3")]
    assert main([*flags, "--train-dataset", "ToyShape", "--random-selection", "--stage2-epochs", "2",
                 "--stage2-lr", "2e-3", "--lr-multipliers", "text=0.5"]) == 0
    assert len(seen) == 16 and {steps for steps, _ in seen} == {16}  # 2 epochs x ceil(64 / 8)
    assert seen[0][1] == {"image": pytest.approx(2e-3), "text": pytest.approx(1e-3)}


def test_a_two_task_sequence_runs_from_the_command_line_and_its_checkpoint_evaluates(tmp_path, capsys):
    save = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # 2000 training images in batches of 250: stage 1 is 8 steps per task.
    argv = [*AST, "--batch-size", "250", "--train-dataset", "ToyShape,ToyColor", "--iterations", "2",
            "--k", "3", "--ast-rank", "largest-v", "--log-every", "1", "--save", str(save)]
    done = subprocess.run([sys.executable, "-m", "mtil.main", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scl_kl" in done.stdout and "AST on ToyColor: 6 of 24 block tensors selected" in done.stdout
    for name in ("ToyShape", "ToyColor"):
        record = json.loads((save / f"ast_selection_{name}.json").read_text())
        assert record["rank"] == "largest-v" and all(len(v) == 3 for v in record["blocks"].values())
    long = mx.read_matrix(save / "accuracy_matrix.csv")
    assert sorted(set(long["after_task"])) == [0, 1, 2]
    # Task 2 trained its own selection from the task-1 weights: only its selected tensors moved.
    first, second = load(save / "ToyShape.pth")["model"], load(save / "ToyColor.pth")["model"]
    selected = json.loads((save / "ast_selection_ToyColor.json").read_text())["selected"]
    assert {n for n in first if not torch.equal(first[n], second[n])} == set(selected)

    # --eval-only with the saved model gives the accuracies the run recorded after its last task.
    capsys.readouterr()
    evaluated = tmp_path / "eval"
    assert main([*EVAL, "--eval-only", "--load", str(save / "ToyColor.pth"), "--eval-datasets",
                 "ToyShape,ToyColor", "--save", str(evaluated)]) == 0
    last = {r.dataset: r.top1 for r in long.itertuples() if r.after_task == 2}
    for name, top1 in last.items():
        rows = pd.read_csv(evaluated / f"metrics_{name}.csv")
        assert rows["top1"].iloc[-1] == pytest.approx(top1, abs=1e-6), name


@pytest.mark.parametrize("flags, words", [
    (["--k", "13"], ["--k 13", "at most 12"]),
    (["--lmbd", "0.5", "-1", "1"], ["--lmbd", "0 or more"]),
    (["--lmbd", "0.5", "0.5"], ["--lmbd", "three"]),
    (["--lmbd", "1", "1", "1", "1"], ["--lmbd", "three"]),
    (["--lmbd", "a", "b", "c"], ["--lmbd", "three numbers"]),
    (["--stage2-lr", "1e-4"], ["--stage2-lr", "--lr"]),  # FAST types --lr
    (["--stage2-epochs", "2"], ["--stage2-epochs", "--iterations"]),
    (["--freeze", "visual.conv1.*"], ["--freeze"]),
    (["--random-selection", "--stage1-epochs", "2"], ["--random-selection", "--stage1-epochs"]),
    (["--random-selection-seed", "3"], ["--random-selection-seed", "--random-selection"]),
    (["--train-mode", "image"], ["--train-mode image", "whole"]),
    (["--model", "tiny-rn"], ["ResNet", "ViT"]),
    (["--lora"], ["--lora", "--method ast"]),
])
def test_bad_flags_are_one_line_errors_before_anything_is_written(flags, words, tmp_path, capsys):
    save = tmp_path / "run"
    assert main([*AST, "--train-dataset", "ToyShape", "--iterations", "2", *flags, "--save", str(save)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("mtil: error:") and captured.err.count("\n") == 1, captured.err
    for word in words:
        assert word in captured.err, (word, captured.err)
    assert not save.exists() or not any(save.iterdir())
    assert "[zero-shot]" not in captured.out


def test_ast_flags_belong_to_ast(capsys):
    """Given to another method they would do nothing: refused."""
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", "--lmbd", "1", "1", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lmbd belongs to --method ast" in err, err
