"""Train modes: exactly the intended parameters change, and frozen parts do no gradient work.

Each run goes through ``mtil.main.main``; ``train_steps`` (as ``sequence.py`` calls it) is wrapped to take the
parameters right before the first step (after the task's set-up, so a linear head already exists) and right after
the last, and CLIP's two encoders are wrapped to record whether they ran with gradients during the steps.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
from clip.model import CLIP

import mtil.engine.sequence as sequence_module
from mtil.datasets.captions import open_caption_dataset
from mtil.datasets.toyworld import ToyTaskDataset
from mtil.main import main
from mtil.methods.contrastive import Contrastive
from mtil.models.transforms import eval_transform

FAST = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--batch-size", "8", "--lr", "1e-3",
        "--warmup-length", "1", "--eval-datasets", "ToyShape", "--max-evaluation-size", "8",
        "--batch-size-eval", "16", "--workers", "0", "--device", "cpu", "--checkpoint-interval", "0"]


@pytest.fixture(autouse=True)
def _small_train_split(monkeypatch):
    """48 training images per toy task: fc mode encodes the whole split, and nothing here needs more."""
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 48)


def _parameters(run, task) -> dict[str, torch.Tensor]:
    params = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    head = run.heads.get(task.name)
    if head is not None:
        params.update({f"head.{n}": p.detach().clone() for n, p in head.named_parameters()})
    return params


@pytest.fixture
def spy(monkeypatch):
    record = SimpleNamespace(inside=False, text_grad=[], image_grad=[], tasks=[])
    original_loop = sequence_module.train_steps

    def train_steps(run, task, components, stream_id, **kwargs):
        before = _parameters(run, task)
        record.inside = True
        try:
            original_loop(run, task, components, stream_id, **kwargs)
        finally:
            record.inside = False
        record.tasks.append(SimpleNamespace(
            task=task, before=before, after=_parameters(run, task),
            grads={n: p.grad for n, p in run.model.named_parameters()}))

    monkeypatch.setattr(sequence_module, "train_steps", train_steps)
    encode_text, encode_image = CLIP.encode_text, CLIP.encode_image

    def counted_text(self, text):
        if record.inside:
            record.text_grad.append(torch.is_grad_enabled())
        return encode_text(self, text)

    def counted_image(self, image):
        if record.inside:
            record.image_grad.append(torch.is_grad_enabled())
        return encode_image(self, image)

    monkeypatch.setattr(CLIP, "encode_text", counted_text)
    monkeypatch.setattr(CLIP, "encode_image", counted_image)
    return record


def changed(task_record) -> set[str]:
    return {n for n, before in task_record.before.items() if not torch.equal(before, task_record.after[n])}


def groups(task_record) -> tuple[set[str], set[str], set[str]]:
    names = set(task_record.grads)
    image = {n for n in names if n.startswith("visual.")}
    text = names - image - {"logit_scale"}
    head = {n for n in task_record.before if n.startswith("head.")}
    return image, text, head


@pytest.mark.parametrize("mode", ["whole", "image", "text", "image-fc", "image-fc-fixed", "fc"])
def test_each_mode_changes_exactly_its_parameters(mode, spy):
    assert main([*FAST, "--train-mode", mode, "--iterations", "3"]) == 0
    (done,) = spy.tasks
    image, text, head = groups(done)
    assert len(image) > 10 and len(text) > 5
    expected = {
        "whole": image | text,
        "image": image,
        "text": text,
        "image-fc": image | head,
        "image-fc-fixed": image,
        "fc": head,
    }[mode]
    if mode in ("image-fc", "image-fc-fixed", "fc"):
        assert head == {"head.linear.weight", "head.linear.bias"}
    else:
        assert head == set()
    assert changed(done) == expected
    assert "logit_scale" not in changed(done)
    # Frozen CLIP parameters get no gradient at all.
    with_grad = {n for n, g in done.grads.items() if g is not None}
    assert with_grad == expected - head

    if mode in ("image", "image-fc", "image-fc-fixed"):
        assert spy.text_grad == []  # class text features computed once at set-up, never per step
        assert spy.image_grad and all(spy.image_grad)
    if mode == "text":
        assert spy.image_grad and not any(spy.image_grad)  # image features without gradient
        assert spy.text_grad and all(spy.text_grad)
    if mode == "whole":
        assert spy.image_grad and all(spy.image_grad) and spy.text_grad and all(spy.text_grad)
    if mode == "fc":
        assert spy.image_grad == [] and spy.text_grad == []  # features were cached before the steps


@pytest.mark.parametrize("iterations", ["2", "9"])  # 9 steps of 8 = more than one pass over the 48 images
def test_fc_encodes_the_training_images_once_per_task(iterations, spy):
    assert main([*FAST, "--train-mode", "fc", "--iterations", iterations]) == 0
    (done,) = spy.tasks
    assert done.task.feature_passes == 1
    assert spy.image_grad == []


def test_freeze_pattern_keeps_parameters_fixed(spy):
    assert main([*FAST, "--train-mode", "whole", "--iterations", "3", "--freeze", "visual.conv1.*"]) == 0
    (done,) = spy.tasks
    image, text, _ = groups(done)
    assert "visual.conv1.weight" in image
    assert changed(done) == (image | text) - {"visual.conv1.weight"}
    assert done.grads["visual.conv1.weight"] is None


def test_freeze_pattern_matching_nothing_exits_2(capsys, spy):
    assert main([*FAST, "--iterations", "3", "--freeze", "visual.nothing_here.*"]) == 2
    err = capsys.readouterr().err
    assert "visual.nothing_here.*" in err and err.count("\n") == 1
    assert spy.tasks == []


def test_contrastive_trains_logit_scale_and_both_encoders(spy):
    argv = ["--model", "micro-vit", "--method", "contrastive", "--train-dataset", "ToyCaptions", "--iterations", "3",
            "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1", "--workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    (done,) = spy.tasks
    image, text, _ = groups(done)
    assert changed(done) == image | text | {"logit_scale"}


def test_contrastive_loss_falls_on_a_fixed_batch(micro):
    model = micro.model.train()
    raw = open_caption_dataset("ToyCaptions")
    transform = eval_transform(model.visual.input_resolution)
    items = [raw[i] for i in range(8)]
    batch = (torch.stack([transform(image) for image, _ in items]), [caption for _, caption in items])
    method = Contrastive(argparse.Namespace())
    run = SimpleNamespace(model=model, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scale = model.logit_scale.detach().clone()
    losses = []
    for _ in range(25):
        loss = method.loss(run, batch)["clip"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(run)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(model.logit_scale.detach(), scale)
    assert 0 <= model.logit_scale.item() <= 4.6052


def test_linear_heads_carry_over_a_chain_of_one_task_runs(tmp_path):
    """``--load`` of an mtil task checkpoint continues a chain: the heads learned so far come with the weights
    (as in one process), so earlier tasks keep being evaluated with their learned heads."""
    save = tmp_path / "chain"
    common = [*FAST[:2], *FAST[4:], "--train-mode", "fc", "--iterations", "2", "--save", str(save)]
    assert "--train-dataset" not in common
    assert main([*common, "--train-dataset", "ToyShape"]) == 0
    first = torch.load(save / "ToyShape.pth", weights_only=True)["heads"]
    assert main([*common, "--train-dataset", "ToyColor", "--load", str(save / "ToyShape.pth")]) == 0
    heads = torch.load(save / "ToyColor.pth", weights_only=True)["heads"]
    assert set(heads) == {"ToyShape", "ToyColor"}
    assert heads["ToyShape"]["kind"] == "linear"
    for key, value in first["ToyShape"]["tensors"].items():
        assert torch.equal(heads["ToyShape"]["tensors"][key], value)
