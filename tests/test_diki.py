"""DIKI (``--method diki``): residual prefix prompts that leave CLIP unchanged at their initial value and follow the
formula, Gaussian statistics as numpy computes them, the likelihood calibration by hand, gradients for the current
task's prompts only, exact resume, ``--label-space seen``, and the trainable-parameter count.

Model-level tests use ``toyclip`` (both back-ends) and hand-built attention modules; runs are in-process
``main([...])`` calls on ``micro-vit`` with a few steps on 48 training images per ToyWorld task.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtil.datasets.fewshot import open_view
from mtil.datasets.toyworld import TASKS, ToyTaskDataset
from mtil.errors import UserError
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods import diki as diki_method
from mtil.methods.diki import Diki
from mtil.models.architectures import OPENAI_ARCHITECTURES
from mtil.models.backend import embed_dim, encode_text
from mtil.models.clip_loading import build_model, load_clip
from mtil.models.diki_prompts import (
    ClassBlock,
    DikiHead,
    DikiKnowledge,
    gaussian_statistics,
    grid_weights,
    prefix_attention,
    prefix_prompts,
    prompt_sites,
    split_features,
)
from mtil.models.heads import head_from_state, head_state
from mtil.models.text import tokenize
from mtil.models.transforms import eval_transform
from tests.helpers import load, run_killed_at

FAST = ["--model", "micro-vit", "--method", "diki", "--batch-size", "8", "--warmup-length", "0",
        "--max-evaluation-size", "16", "--batch-size-eval", "16", "--workers", "0", "--device", "cpu",
        "--threads", "1"]
TWO_TASKS = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "6", "--checkpoint-interval", "2"]
BACKENDS = ["toyclip", "open_clip:mtil-tiny-vit/toyclip"]
ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def small_toy_train(monkeypatch):
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 48)


def knowledge_for(model: nn.Module, tasks: int = 2, length: int = 8, seed: int = 0) -> DikiKnowledge:
    """A knowledge of ``tasks`` tasks with the official initial prompts and identity statistics."""
    sites = prompt_sites(model, 8)
    knowledge = DikiKnowledge(len(sites.image), len(sites.text), length, sites.image_width, sites.text_width,
                              embed_dim(model))
    generator = torch.Generator().manual_seed(seed)
    dim = embed_dim(model)
    for _ in range(tasks):
        knowledge.add_task(torch.zeros(dim), torch.eye(dim), generator)
    return knowledge


def randomise_values(knowledge: DikiKnowledge, seed: int = 1, std: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for task in knowledge.tasks:
            for prompt in [*task.image, *task.text]:
                prompt[1].copy_(torch.randn(prompt[1].shape, generator=generator) * std)
        knowledge.bump()


def probe(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return images, tokenize(model, ["a photo of a red circle.", "a blue square", "zzz"])


# ------------------------------------------------------------------------------------------------ the prompts
@pytest.mark.parametrize("name", BACKENDS)
def test_initial_prompts_leave_clip_unchanged(name):
    """Keys uniform in [-1, 1] and values zero: the residual term is exactly zero, per-sample tasks and weights
    included; the calibrated encoding's features are CLIP's own. Non-zero values do change the outputs."""
    model = load_clip(name).model.eval()
    knowledge = knowledge_for(model)
    images, tokens = probe(model)
    sites = knowledge.sites(model)
    keys = [k.abs().max().item() for task in knowledge.tasks for p in [*task.image, *task.text] for k in p[0]]
    assert 0.5 < max(keys) <= 1.0
    with torch.no_grad():
        plain_image, plain_text = model.encode_image(images), encode_text(model, tokens)
        k, v = knowledge.image_prompts(torch.tensor([0, 1, 1, 0]))
        with prefix_prompts(sites.image, k, v, torch.tensor([0.2, 1.0, 0.7, 0.9])):
            image = model.encode_image(images)
        k, v = knowledge.task_prompts(1, "text")
        with prefix_prompts(sites.text, k, v):
            text = encode_text(model, tokens)
        calibrated = knowledge.encode_image(model, images)
    assert torch.equal(image, plain_image) and torch.equal(text, plain_text)
    features, _, _ = split_features(calibrated, knowledge.dim)
    assert torch.equal(features, F.normalize(plain_image.float(), dim=-1))
    randomise_values(knowledge)
    with torch.no_grad():
        k, v = knowledge.image_prompts(torch.tensor([0, 1, 1, 0]))
        with prefix_prompts(sites.image, k, v, torch.tensor([0.2, 1.0, 0.7, 0.9])):
            moved = model.encode_image(images)
        assert torch.equal(model.encode_image(images), plain_image)  # the hooks are gone
    assert (moved - plain_image).abs().max() > 1e-3


def test_both_backends_compute_the_same_prompted_features():
    """The same weights through clip-anytorch ((L, N, D) blocks) and open_clip (batch-first): the same prompted
    features."""
    outputs = []
    for name in BACKENDS:
        model = load_clip(name).model.eval()
        knowledge = knowledge_for(model)
        randomise_values(knowledge)
        images, tokens = probe(model)
        with torch.no_grad():
            k, v = knowledge.image_prompts(torch.tensor([1, 0, 1, 1]))
            with prefix_prompts(knowledge.sites(model).image, k, v, torch.tensor([0.5, 0.25, 1.0, 0.8])):
                image = model.encode_image(images)
            k, v = knowledge.task_prompts(0, "text")
            with prefix_prompts(knowledge.sites(model).text, k, v, 0.6):
                text = encode_text(model, tokens)
        outputs.append((image, text))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
def test_residual_attention_equals_the_formula_by_hand(batch_first):
    """out = W_o (Attn(q, K, V) + w Attn(q, P_k, P_v)) + b_o per head: the prompt attention has its own softmax
    over the prompt slots, ignores the block's (causal) mask, and takes P_k, P_v without the key/value
    projections; q is the block's own query projection."""
    torch.manual_seed(0)
    width, heads, length, batch, slots = 16, 4, 5, 3, 3
    attn = nn.MultiheadAttention(width, heads, batch_first=batch_first).eval()
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    x = torch.randn(batch, length, width)
    keys, values = torch.randn(batch, slots, width), torch.randn(batch, slots, width)
    weight = torch.rand(batch)
    mask = torch.full((length, length), float("-inf")).triu(1)
    inputs = x if batch_first else x.transpose(0, 1)
    with torch.no_grad(), prefix_prompts([attn], [keys], [values], weight):
        got = attn(inputs, inputs, inputs, need_weights=False, attn_mask=mask)[0]
    got = got if batch_first else got.transpose(0, 1)

    w_in, b_in = attn.in_proj_weight.detach().double().numpy(), attn.in_proj_bias.detach().double().numpy()
    w_out, b_out = attn.out_proj.weight.detach().double().numpy(), attn.out_proj.bias.detach().double().numpy()
    d = width // heads

    def softmax(a):
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    want = np.zeros((batch, length, width))
    for n in range(batch):
        xn = x[n].double().numpy()
        q, k, v = (xn @ w_in[i * width:(i + 1) * width].T + b_in[i * width:(i + 1) * width] for i in range(3))
        pk, pv = keys[n].double().numpy(), values[n].double().numpy()
        inner = np.zeros((length, width))
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            own = softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d) + mask.double().numpy()) @ v[:, cols]
            prompt = softmax(q[:, cols] @ pk[:, cols].T / math.sqrt(d)) @ pv[:, cols]
            inner[:, cols] = own + float(weight[n]) * prompt
        want[n] = inner @ w_out.T + b_out
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)
    # and the residual term alone, without the block's attention
    term = prefix_attention(attn, inputs, keys, values, weight)
    assert term.shape == inputs.shape


# ------------------------------------------------------------------------------------------------ statistics
def test_statistics_equal_numpy(small_toy_train, tmp_path, monkeypatch):
    """The stored mean and covariance of a task are numpy's mean and np.cov (unbiased) + 1e-7 I of the
    L2-normalised prompt-free features of its training split (recomputed here from the plain model)."""
    seen = []
    original = diki_method.gaussian_statistics
    monkeypatch.setattr(diki_method, "gaussian_statistics", lambda f: seen.append(f.clone()) or original(f))
    save = tmp_path / "run"
    argv = ["--model", "toyclip", "--method", "diki", "--train-dataset", "ToyShape", "--iterations", "2",
            "--batch-size", "8", "--batch-size-eval", "16", "--max-evaluation-size", "16", "--workers", "0",
            "--device", "cpu", "--threads", "1", "--save", str(save)]
    assert main(argv) == 0
    [features] = seen
    model = load_clip("toyclip").model.eval()
    data = open_view("ToyShape", "data", False, None).dataset("train", eval_transform(32))
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        plain = F.normalize(model.encode_image(images).float(), dim=-1)
    assert len(data) == 48 and torch.allclose(features, plain, atol=1e-6)
    state = load(save / "ToyShape.pth")["methods"]["diki"]
    assert state["tasks"] == ["ToyShape"]
    mean, cov = state["knowledge"]["tasks.0.mean"], state["knowledge"]["tasks.0.cov"]
    x = features.double().numpy()
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(cov.numpy(), np.cov(x, rowvar=False) + 1e-7 * np.eye(x.shape[1]), rtol=1e-12,
                               atol=1e-15)
    with pytest.raises(UserError, match="at least 2"):
        gaussian_statistics(features[:1])


def test_calibration_follows_the_formula_by_hand():
    """Per image: l_t = log N(f; mean_t, cov_t) of a multivariate Gaussian, the task of the largest l, and
    w = sigmoid(l / d - 1) with d the feature dimension (here 8, not the official code's 512)."""
    dim, generator = 8, torch.Generator().manual_seed(0)
    knowledge = DikiKnowledge(1, 1, 2, 16, 16, dim)
    centres = F.normalize(torch.randn(3, dim, generator=generator), dim=-1)
    for centre in centres:
        samples = F.normalize(centre + 0.15 * torch.randn(40, dim, generator=generator), dim=-1)
        knowledge.add_task(*gaussian_statistics(samples), generator)
    queries = F.normalize(centres[torch.tensor([0, 1, 2, 2, 0, 1])] + 0.1 * torch.randn(6, dim, generator=generator),
                          dim=-1)
    index, weight, best = knowledge.calibrate(queries)
    x = queries.double().numpy()
    likelihoods = np.zeros((6, 3))
    for t, task in enumerate(knowledge.tasks):
        mean, cov = task.mean.numpy(), task.cov.numpy()
        _, logdet = np.linalg.slogdet(cov)
        for n in range(6):
            delta = x[n] - mean
            likelihoods[n, t] = -0.5 * (dim * math.log(2 * math.pi) + logdet + delta @ np.linalg.solve(cov, delta))
    chosen = likelihoods.argmax(axis=1)
    top = likelihoods[np.arange(6), chosen]
    assert index.tolist() == chosen.tolist() == [0, 1, 2, 2, 0, 1]
    np.testing.assert_allclose(best.numpy(), top, rtol=1e-9)
    np.testing.assert_allclose(weight.numpy(), 1 / (1 + np.exp(-(top / dim - 1))), rtol=1e-6)
    assert knowledge.log_likelihoods(queries).shape == (6, 3)


def test_the_head_scores_with_each_images_task_and_weight():
    """The head encodes each image with its chosen task's prompts at its own weight (as by hand, one image at a
    time), and scores it against text features interpolated between the two neighbouring grid weights, each
    computed exactly; at a grid weight the text feature is the exact one. A multi-dataset head (--label-space
    seen) gives each dataset's block exactly the one-dataset head's logits."""
    model = load_clip("toyclip").model.eval()
    knowledge = knowledge_for(model, tasks=2)
    randomise_values(knowledge, std=0.3)
    images, _ = probe(model)
    with torch.no_grad():
        plain = F.normalize(model.encode_image(images).float(), dim=-1)
    for t, rows in enumerate((plain[:2], plain[2:])):  # each task's Gaussian around two of the images
        with torch.no_grad():
            knowledge.tasks[t].mean.copy_(rows.double().mean(0))
            knowledge.tasks[t].cov.copy_(torch.eye(knowledge.dim, dtype=torch.float64) * 0.05)
    knowledge.bump()
    classes = ["red", "blue", "green"]
    block = ClassBlock("colours", tokenize(model, [f"a {c} object." for c in classes]), 1)
    other = ClassBlock("shapes", tokenize(model, ["a circle.", "a square."]), 1)
    scale = float(model.logit_scale.detach().exp())
    head = DikiHead(knowledge, [block], grid=3, logit_scale=scale, model=model)
    with torch.no_grad():
        features = head.encode(model, images)
        logits = head(features)
        image, index, weight = split_features(features, knowledge.dim)
        assert index.tolist() == [0, 0, 1, 1]
        sites = knowledge.sites(model)
        for n in range(4):
            t, w = int(index[n]), float(weight[n])
            k, v = knowledge.task_prompts(t, "image")
            with prefix_prompts(sites.image, k, v, w):
                alone = F.normalize(model.encode_image(images[n:n + 1]).float(), dim=-1)
            torch.testing.assert_close(image[n:n + 1], alone, atol=1e-5, rtol=1e-5)
            exact = []
            for grid_weight in grid_weights(3):
                k, v = knowledge.task_prompts(t, "text")
                with prefix_prompts(sites.text, k, v, grid_weight):
                    exact.append(F.normalize(encode_text(model, block.tokens).float(), dim=-1))
            lower = min(int(w * 2), 1)
            fraction = w * 2 - lower
            text = F.normalize((1 - fraction) * exact[lower] + fraction * exact[lower + 1], dim=-1)
            torch.testing.assert_close(logits[n], scale * image[n] @ text.T, atol=1e-4, rtol=1e-5)
        on_grid = torch.cat([image, index[:, None].float(), torch.full((4, 1), 0.5)], dim=1)
        k, v = knowledge.task_prompts(1, "text")
        with prefix_prompts(sites.text, k, v, 0.5):
            text = F.normalize(encode_text(model, block.tokens).float(), dim=-1)
        torch.testing.assert_close(head(on_grid)[2:], scale * image[2:] @ text.T, atol=1e-5, rtol=1e-6)
        both = DikiHead(knowledge, [other, block], grid=3, logit_scale=scale, model=model)
        assert both.num_classes == 5
        assert torch.equal(both(features)[:, 2:], logits)
    restored = head_from_state(head_state(head))  # a checkpoint's head: the same logits from the same model
    with torch.no_grad():
        assert torch.equal(restored(restored.encode(model, images)), logits)


# ------------------------------------------------------------------------------------------------ training
def test_only_the_current_tasks_prompts_receive_gradients(small_toy_train, tmp_path, monkeypatch, capsys):
    """While task 2 trains, the optimiser holds exactly task 2's prompts; task 1's have no gradient and keep their
    task-end values; CLIP's weights never move. The printed count equals the prompts' shapes."""
    records = []

    def after_backward(self, run):
        pools = self.knowledge.tasks
        held = [p for group in run.task.optimizer.param_groups for p in group["params"]]
        records.append({
            "task": len(run.state.completed),
            "held_current": [id(p) for p in held] == [id(p) for p in pools[self.current].parameters()],
            "old_grads": [p.grad for i, pool in enumerate(pools) if i != self.current for p in pool.parameters()],
            "old_trainable": any(p.requires_grad for i, pool in enumerate(pools) if i != self.current
                                 for p in pool.parameters()),
            "current_grad": min(float(p.grad.abs().sum()) for p in pools[self.current].parameters()),
            "clip_grads": [p.grad for p in run.model.parameters() if p.grad is not None or p.requires_grad]})

    monkeypatch.setattr(Diki, "after_backward", after_backward)
    save = tmp_path / "run"
    assert main([*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "3", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert [r["task"] for r in records] == [0, 0, 0, 1, 1, 1]
    for record in records:
        assert record["held_current"] and not record["old_trainable"] and record["clip_grads"] == []
        assert all(g is None for g in record["old_grads"]) and record["current_grad"] > 0
    first, last = load(save / "ToyShape.pth"), load(save / "ToyColor.pth")
    before, after = first["methods"]["diki"]["knowledge"], last["methods"]["diki"]["knowledge"]
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # task 1's prompts and statistics, and the layout
    assert not torch.equal(after["tasks.1.image.0"][1], torch.zeros_like(after["tasks.1.image.0"][1]))
    for name, value in first["model"].items():
        assert torch.equal(last["model"][name], value), name
    # micro-vit: 1 block of width 64 per encoder, 8 prompt vectors, keys and values
    per_task = 2 * (1 * 2 * 8 * 64)
    assert f"DIKI on ToyShape: {per_task:,} trainable parameters" in out
    assert f"{2 * per_task:,} over the sequence's 2 tasks" in out
    assert last["heads"]["ToyShape"]["kind"] == "diki"


def test_trainable_parameters_of_vit_b16_are_the_papers():
    """ViT-B/16 (12 blocks of width 768 and 512), 8 blocks x 8 prompts per encoder: 163 840 per task, 1 802 240
    over 11 tasks (the paper's 1.8 M), counted from the prompts the code creates."""
    with torch.device("meta"):
        model = build_model(OPENAI_ARCHITECTURES["ViT-B/16"])
        sites = prompt_sites(model, 8)
        knowledge = DikiKnowledge(len(sites.image), len(sites.text), 8, sites.image_width, sites.text_width,
                                  embed_dim(model))
        for _ in range(11):
            knowledge.tasks.append(knowledge.new_task())
    by_hand = 8 * 2 * 8 * 768 + 8 * 2 * 8 * 512
    assert by_hand == 163_840
    assert [knowledge.parameter_count(t) for t in range(11)] == [by_hand] * 11
    assert sum(p.numel() for p in knowledge.parameters()) == 11 * by_hand == 1_802_240


# ------------------------------------------------------------------------------------------------ resume
def outcome(save) -> dict:
    cells, order = mx.matrix_from_results(save / "results.jsonl")
    return {"matrix": mx.read_matrix(save / "accuracy_matrix.csv"), "cells": cells, "order": order,
            "checkpoints": {name: load(save / name) for name in ("ToyShape.pth", "ToyColor.pth")}}


def assert_same_outcome(got: dict, want: dict) -> None:
    pd.testing.assert_frame_equal(got["matrix"], want["matrix"], check_exact=True)
    pd.testing.assert_frame_equal(got["cells"], want["cells"], check_exact=True)
    assert got["order"] == want["order"]
    for name, ckpt in want["checkpoints"].items():
        other = got["checkpoints"][name]
        for part in ("model", "heads", "methods"):
            a, b = dict(_flat(other[part])), dict(_flat(ckpt[part]))
            assert a.keys() == b.keys(), (name, part)
            for key in a:
                assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], \
                    (name, key)
        assert other["state"] == ckpt["state"], name


def _flat(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flat(item, f"{prefix}/{key}")
    elif isinstance(value, list) and not all(isinstance(v, str) for v in value):
        for i, item in enumerate(value):
            yield from _flat(item, f"{prefix}/{i}")
    else:
        yield prefix, value


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ToyTaskDataset.default_sizes, "train", 48)
        save = tmp_path_factory.mktemp("straight") / "run"
        assert main([*TWO_TASKS, "--save", str(save)]) == 0
        return outcome(save)


@pytest.mark.parametrize("step", [5, 1], ids=["mid-task", "boundary"])
def test_a_killed_run_resumes_exactly(step, straight_run, small_toy_train, tmp_path, monkeypatch):
    """Killed at step 5 of task 2 (its last checkpoint: step 4, mid-task) or step 1 (the last checkpoint is the
    boundary after task 1), then resumed: the straight run's matrix, prompts, statistics and heads exactly."""
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*TWO_TASKS, "--save", str(save)], ["ToyShape"], step, method=Diki)
    latest = load(save / "latest.pth")
    assert latest["state"]["step"] == (4 if step == 5 else 0)
    assert ("optimizer" in latest) == (step == 5)
    assert main([*TWO_TASKS, "--save", str(save)]) == 0
    assert_same_outcome(outcome(save), straight_run)
    # the trained prompts moved away from their initial values (else the comparison would prove little)
    knowledge = straight_run["checkpoints"]["ToyColor.pth"]["methods"]["diki"]["knowledge"]
    assert knowledge["tasks.1.image.0"][1].abs().max() > 0


# ------------------------------------------------------------------------------------------------ label spaces
def test_seen_equals_dataset_when_one_task_was_trained(small_toy_train, tmp_path, monkeypatch):
    """After one task, the trained dataset's cell is the same in both label spaces; the other dataset under seen
    is scored by the method's own head over both datasets' classes (not the evaluator's union)."""
    calls = []
    original = Diki.task_agnostic_head

    def spy(self, run, dataset, layout):
        head = original(self, run, dataset, layout)
        calls.append((dataset, tuple(layout), type(head).__name__, head.num_classes))
        return head

    monkeypatch.setattr(Diki, "task_agnostic_head", spy)
    argv = [*FAST, "--train-dataset", "ToyShape", "--iterations", "3", "--eval-datasets", "ToyShape,ToyColor"]
    cells = {}
    for space in ("dataset", "seen"):
        save = tmp_path / space
        assert main([*argv, "--label-space", space, "--save", str(save)]) == 0
        cells[space] = mx.matrix_from_results(save / "results.jsonl")[0]
    trained = {space: frame[frame["dataset"] == "ToyShape"].reset_index(drop=True) for space, frame in cells.items()}
    assert len(trained["seen"]) == 2  # the zero-shot row and the row after the task
    pd.testing.assert_frame_equal(trained["dataset"], trained["seen"], check_exact=True)
    shapes, colours = len(TASKS["ToyShape"].classes), len(TASKS["ToyColor"].classes)
    assert calls and set(calls) == {("ToyColor", ("ToyShape", "ToyColor"), "DikiHead", shapes + colours)}


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals_are_one_line(capsys, small_toy_train, tmp_path):
    """A ResNet image encoder, a timm tower, and engine flags DIKI replaces or cannot honour: one line each."""
    for extra, words in ((["--model", "tiny-rn", "--iterations", "2"], "is a ResNet"),
                         (["--lr", "1e-3", "--iterations", "2"], "--diki-lr"),
                         (["--diki-epochs", "2", "--iterations", "3"], "give one of them"),
                         (["--diki-text-grid", "1", "--iterations", "2"], "at least its two ends"),
                         (["--optimizer", "adamw", "--iterations", "2"], "SGD")):
        assert main([*FAST, "--train-dataset", "ToyShape", *extra, "--save", str(tmp_path / "refused")]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("mtil: error:") and err.strip().count("\n") == 0 and words in err, err
    assert not (tmp_path / "refused").exists()
    trunk = nn.Module()
    trunk.visual = nn.Module()
    trunk.visual.trunk = nn.Linear(2, 2)
    with pytest.raises(UserError, match="timm tower") as error:
        prompt_sites(trunk, 8, model_name="open_clip:ViT-B-16-SigLIP")
    assert "\n" not in str(error.value)


def test_default_length_is_diki_epochs_and_flags_shape_the_prompts(small_toy_train, tmp_path, capsys):
    """Without --iterations / --epochs a task lasts --diki-epochs epochs; --diki-depth and --diki-length shape the
    prompts; --diki-lr is the SGD learning rate; --diki-eval-templates all encodes every template."""
    save = tmp_path / "run"
    argv = ["--model", "toyclip", "--method", "diki", "--train-dataset", "ToyShape", "--diki-epochs", "1",
            "--diki-depth", "1", "--diki-length", "3", "--diki-lr", "0.5", "--diki-text-grid", "2",
            "--diki-eval-templates", "all", "--batch-size", "16", "--warmup-length", "0", "--batch-size-eval", "16",
            "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu", "--threads", "1", "--log-every", "1",
            "--save", str(save)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step 3/3" in out  # 48 images / batch 16, one epoch
    after_first = 0.5 * 0.5 * (1 + math.cos(math.pi / 3))  # the lr the cosine from --diki-lr sets for step 2
    assert f"lr {after_first:.2e}" in out.split("step 1/3")[1].splitlines()[0]
    assert f"DIKI on ToyShape: {2 * 1 * 2 * 3 * 64:,} trainable parameters" in out
    checkpoint = load(save / "ToyShape.pth")
    knowledge = checkpoint["methods"]["diki"]["knowledge"]
    assert knowledge["tasks.0.image.0"].shape == (2, 3, 64) and "tasks.0.image.1" not in knowledge
    head = checkpoint["heads"]["ToyShape"]["tensors"]
    templates = len(open_view("ToyShape", "data", False, None).templates)
    assert int(head["grid"]) == 2 and int(head["block.0.templates"]) == templates > 1


def test_a_chain_of_one_task_processes_continues_from_the_heads(straight_run, small_toy_train, tmp_path):
    """The next link of a one-task-per-process chain (``--load`` of the previous link's checkpoint) takes the
    earlier tasks' prompts and statistics from the checkpoint's DIKI heads: it ends with the straight run's."""
    save = tmp_path / "chain"
    link = [*TWO_TASKS[:TWO_TASKS.index("--train-dataset")], "--iterations", "6", "--checkpoint-interval", "2"]
    assert main([*link, "--train-dataset", "ToyShape", "--save", str(save)]) == 0
    assert main([*link, "--train-dataset", "ToyColor", "--load", str(save / "ToyShape.pth"),
                 "--save", str(save)]) == 0
    got = load(save / "ToyColor.pth")["methods"]["diki"]
    want = straight_run["checkpoints"]["ToyColor.pth"]["methods"]["diki"]
    assert got["tasks"] == want["tasks"] == ["ToyShape", "ToyColor"]
    for name, value in want["knowledge"].items():
        assert torch.equal(got["knowledge"][name], value), name


def test_two_processes_train_as_one(tmp_path):
    """torchrun with 2 processes (gloo, CPU): each rank's equal share of every batch, DDP's average, rank 0's
    statistics: the prompts of one process up to float rounding, the statistics exactly."""
    argv = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--shots", "4", "--iterations", "4", "--batch-size", "4",
            "--diki-lr", "0.5", "--checkpoint-interval", "0", "--eval-datasets", "ToyShape"]
    assert main([*argv, "--save", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mtil.main", *argv, "--save", str(tmp_path / "two")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load(tmp_path / "one" / "ToyColor.pth")["methods"]["diki"]["knowledge"]
    two = load(tmp_path / "two" / "ToyColor.pth")["methods"]["diki"]["knowledge"]
    assert one.keys() == two.keys()
    for name, value in one.items():
        if "mean" in name or "cov" in name or name == "layout":
            assert torch.equal(two[name], value), name
        else:
            torch.testing.assert_close(two[name], value, atol=1e-6, rtol=1e-5)
    assert (one["tasks.1.image.0"][1] != 0).any()  # trained
