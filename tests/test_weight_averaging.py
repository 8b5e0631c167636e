"""Weight-space components: L2 consolidation, weight ensembling (WE, we_wise), EMA, the WiSE-FT merge at a task's
end, ``interpolate`` / ``load_into``, and evaluation-time WiSE-FT (``--eval-only --load CKPT --wise-ft``).

Two levels: the components' hooks called directly on a toy ``nn.Module`` inside a fake run (exact formulas,
any number of steps), and real ``micro-vit`` runs whose per-step weights are recorded by wrapping the hooks.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from mtil.args import parse_args
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.main import main
from mtil.engine.weights import interpolate, load_into
from mtil.methods.ema import ExponentialMovingAverage
from mtil.methods.l2 import L2Consolidation
from mtil.methods.weight_ensemble import WeightEnsemble
from mtil.methods.wise_merge import WiseMerge
from mtil.registry import build_components
from mtil.models.clip_loading import load_clip
from tests.helpers import load

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------ fake runs


class Toy(nn.Module):
    """Two layers; ``b.bias`` is frozen (not trainable), as e.g. ``logit_scale`` in CLIP."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.b.bias.requires_grad_(False)


def fake_run(model: nn.Module, *flags: str, zeroshot: dict | None = None) -> SimpleNamespace:
    """What the weight-space components use of a run: model, config, state.step, zeroshot_state()."""
    return SimpleNamespace(model=model, config=parse_args(["--train-dataset", "ToyShape", *flags]), state=SimpleNamespace(step=0),
                           device=torch.device("cpu"), zeroshot_state=lambda: zeroshot)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


TRAINABLE = ["a.weight", "a.bias", "b.weight"]


@torch.no_grad()
def fake_step(model: nn.Module, generator: torch.Generator) -> None:
    """An 'optimiser step': move every trainable parameter."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=generator))


def assert_close(got: dict, want: dict, names, atol: float = 1e-6) -> None:
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=atol, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------ interpolate


def test_interpolate_endpoints_and_load_into():
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, 2, generator=g), "y": torch.randn(4, generator=g)}
    b = {"x": torch.randn(3, 2, generator=g), "y": torch.randn(4, generator=g), "z": torch.randn(1, generator=g)}
    for n in a:
        assert torch.equal(interpolate(a, b, 1.0)[n], a[n])
        assert torch.equal(interpolate(a, b, 0.0)[n], b[n])
        torch.testing.assert_close(interpolate(a, b, 0.25)[n], 0.25 * a[n] + 0.75 * b[n])
    assert set(interpolate(a, b, 0.5)) == {"x", "y"}  # over the names of a only

    model = Toy()
    before = weights(model)
    values = {"a.weight": torch.full((4, 3), 2.0), "b.bias": torch.full((2,), -1.0)}
    load_into(model, values)
    after = weights(model)
    assert torch.equal(after["a.weight"], values["a.weight"]) and torch.equal(after["b.bias"], values["b.bias"])
    assert torch.equal(after["a.bias"], before["a.bias"]) and torch.equal(after["b.weight"], before["b.weight"])
    assert model.a.weight.requires_grad and not model.b.bias.requires_grad  # copies values, keeps the flags


# ------------------------------------------------------------------------------------------------ L2


def test_l2_hook_is_l2_times_squared_distance_to_task_start():
    g = torch.Generator().manual_seed(1)
    model = Toy()
    run = fake_run(model, "--l2", "0.3")
    l2 = L2Consolidation(run.config)
    l2.before_task(run, None)
    start = weights(model)
    assert l2.loss(run, None)["l2"].item() == 0.0
    for _ in range(3):
        fake_step(model, g)
        with torch.no_grad():
            model.b.bias.add_(5.0)  # a frozen parameter that changes is no part of the penalty
        now = weights(model)
        by_hand = 0.3 * sum(((now[n].double() - start[n].double()) ** 2).sum() for n in TRAINABLE)
        value = l2.loss(run, None)["l2"]
        assert not value.requires_grad  # its gradient is added in after_backward, not back-propagated
        assert value.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # A new task moves the anchor to the weights it starts from.
    l2.before_task(run, None)
    assert l2.loss(run, None)["l2"].item() == 0.0


@pytest.mark.parametrize("unused", [False, True])
def test_l2_gradient_added_after_backward_equals_back_propagating_the_penalty(unused):
    """The closed-form 2 W (theta - theta0) added to the gradients gives exactly what autograd gives for
    CE + W * sum ||theta - theta0||^2, also for a trainable tensor CE leaves without a gradient."""
    g = torch.Generator().manual_seed(3)
    model = Toy()
    run = fake_run(model, "--l2", "0.3")
    l2 = L2Consolidation(run.config)
    l2.before_task(run, None)
    start = weights(model)
    fake_step(model, g)
    x = torch.randn(5, 3, generator=g)

    def task_loss():
        hidden = model.a(x)
        return model.b(hidden.detach() if unused else hidden).square().mean()

    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    (task_loss() + 0.3 * sum(((params[n] - start[n]) ** 2).sum() for n in TRAINABLE)).backward()
    expected = {n: params[n].grad.clone() for n in TRAINABLE}
    model.zero_grad(set_to_none=True)
    task_loss().backward()
    assert (params["a.weight"].grad is None) == unused
    l2.after_backward(run)
    for n in TRAINABLE:
        torch.testing.assert_close(params[n].grad, expected[n], rtol=1e-6, atol=1e-6)
    assert params["b.bias"].grad is None  # frozen: no part of the penalty


def test_l2_in_a_run_is_zero_first_then_the_hand_computed_penalty(monkeypatch):
    """``--l2 0.5``: at each step's loss, L2 == 0.5 * sum over trainable parameters of (theta - theta0)^2 with
    theta0 = the task-start weights, here the zero-shot micro-vit rebuilt independently."""
    start = {n: p.detach().clone() for n, p in load_clip("micro-vit", seed=0).model.named_parameters()}
    seen = []
    original = L2Consolidation.loss

    def loss(self, run, batch):
        terms = original(self, run, batch)
        trainable = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
        by_hand = 0.5 * sum(((p.detach().double() - start[n].double()) ** 2).sum() for n, p in trainable)
        seen.append((run.state.step, terms["l2"].item(), by_hand.item(), len(trainable)))
        return terms

    monkeypatch.setattr(L2Consolidation, "loss", loss)
    assert main([*FAST, "--l2", "0.5", "--train-dataset", "ToyShape", "--iterations", "3",
                 "--eval-datasets", "ToyShape"]) == 0
    assert [s for s, *_ in seen] == [0, 1, 2]
    assert seen[0][1] == 0.0 and seen[0][2] == 0.0
    assert seen[0][3] == len(start) - 1  # whole mode: everything but logit_scale
    for step, value, by_hand, _ in seen[1:]:
        assert value > 0
        assert value == pytest.approx(by_hand, rel=1e-4), step


# ------------------------------------------------------------------------------------------------ WE


@pytest.mark.parametrize("freq, steps", [(1, 4), (2, 5), (3, 7)])
@pytest.mark.parametrize("wise", [False, True])
def test_weight_ensemble_hooks_average_start_and_every_averaging_step(freq, steps, wise):
    g = torch.Generator().manual_seed(freq * 10 + steps)
    model = Toy()
    flags = ["--we", "--avg-freq", str(freq)] + (["--we-wise", "--we-wise-alpha", "0.7"] if wise else [])
    run = fake_run(model, *flags)
    we = WeightEnsemble(run.config)
    we.before_task(run, None)
    start = weights(model)
    averaged = [start]
    for step in range(1, steps + 1):
        fake_step(model, g)
        run.state.step = step
        we.after_step(run)
        if step % freq == 0:
            averaged.append(weights(model))
    assert we.count == len(averaged)
    trained = weights(model)
    if steps % freq:  # the steps after the last averaging step count too: the final weights join the average
        averaged.append(trained)
    we.after_task(run, None)
    mean = {n: torch.stack([w[n] for w in averaged]).mean(0) for n in TRAINABLE}
    want = {n: 0.7 * mean[n] + 0.3 * start[n] for n in TRAINABLE} if wise else mean
    assert_close(weights(model), want, TRAINABLE)
    assert torch.equal(model.b.bias, start["b.bias"])
    assert not torch.allclose(model.a.weight, trained["a.weight"])


def record_after_step(monkeypatch, component: type) -> list[dict[str, torch.Tensor]]:
    """The model's weights at each ``component.after_step`` call (i.e. right after each optimiser step)."""
    snapshots: list[dict[str, torch.Tensor]] = []
    original = component.after_step

    def after_step(self, run):
        snapshots.append({n: p.detach().clone() for n, p in run.model.named_parameters()})
        original(self, run)

    monkeypatch.setattr(component, "after_step", after_step)
    return snapshots


def zeroshot_micro() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in load_clip("micro-vit", seed=0).model.named_parameters()}


@pytest.mark.parametrize("wise", [False, True])
def test_weight_ensemble_run_result_is_the_hand_computed_average(wise, tmp_path, monkeypatch):
    """``--we --avg-freq 1`` over 3 steps: the task's weights = mean(start, w1, w2, w3) (``--we-wise``: alpha *
    that + (1 - alpha) * start); the frozen logit_scale stays."""
    snapshots = record_after_step(monkeypatch, WeightEnsemble)
    extra = ["--we-wise", "--we-wise-alpha", "0.6"] if wise else []
    assert main([*FAST, "--we", "--avg-freq", "1", *extra, "--train-dataset", "ToyShape", "--iterations", "3",
                 "--eval-datasets", "ToyShape", "--save", str(tmp_path)]) == 0
    assert len(snapshots) == 3
    start = zeroshot_micro()
    result = load(tmp_path / "ToyShape.pth")["model"]
    names = [n for n in start if n != "logit_scale"]
    mean = {n: torch.stack([start[n]] + [s[n] for s in snapshots]).mean(0) for n in names}
    want = {n: 0.6 * mean[n] + 0.4 * start[n] for n in names} if wise else mean
    assert_close(result, want, names)
    assert torch.equal(result["logit_scale"], start["logit_scale"])
    assert not torch.allclose(result["visual.conv1.weight"], snapshots[-1]["visual.conv1.weight"], atol=1e-6)


def test_weight_ensemble_keeps_a_task_shorter_than_the_averaging_interval(tmp_path):
    """3 steps with --avg-freq 100 (the default): the result is mean(start, final), not the start weights."""
    assert main([*FAST, "--we", "--train-dataset", "ToyShape", "--iterations", "3", "--eval-datasets", "ToyShape",
                 "--save", str(tmp_path)]) == 0
    start = zeroshot_micro()
    result = load(tmp_path / "ToyShape.pth")["model"]
    assert not torch.equal(result["visual.conv1.weight"], start["visual.conv1.weight"])


# ------------------------------------------------------------------------------------------------ EMA


def test_ema_hooks_follow_the_formula_step_by_step():
    g = torch.Generator().manual_seed(2)
    model = Toy()
    run = fake_run(model, "--ema", "0.8")
    ema = ExponentialMovingAverage(run.config)
    ema.before_task(run, None)
    shadow = {n: p.clone() for n, p in weights(model).items() if n in TRAINABLE}
    for step in range(1, 6):
        fake_step(model, g)
        run.state.step = step
        trained = weights(model)
        ema.after_step(run)
        shadow = {n: 0.8 * shadow[n] + 0.2 * trained[n] for n in TRAINABLE}
        assert_close(ema.shadow, shadow, TRAINABLE)
        assert_close(weights(model), trained, TRAINABLE, atol=0)  # training continues from the raw weights
    frozen = model.b.bias.detach().clone()
    ema.after_task(run, None)
    assert_close(weights(model), shadow, TRAINABLE)
    assert torch.equal(model.b.bias, frozen)


def test_ema_run_result_is_the_ema_of_the_step_weights(tmp_path, monkeypatch):
    snapshots = record_after_step(monkeypatch, ExponentialMovingAverage)
    assert main([*FAST, "--ema", "0.6", "--train-dataset", "ToyShape", "--iterations", "4",
                 "--eval-datasets", "ToyShape", "--save", str(tmp_path)]) == 0
    assert len(snapshots) == 4
    start = zeroshot_micro()
    names = [n for n in start if n != "logit_scale"]
    ema = {n: start[n].clone() for n in names}
    for s in snapshots:
        ema = {n: 0.6 * ema[n] + 0.4 * s[n] for n in names}
    result = load(tmp_path / "ToyShape.pth")["model"]
    assert_close(result, ema, names)
    assert not torch.allclose(result["visual.conv1.weight"], snapshots[-1]["visual.conv1.weight"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ WiSE merge


@pytest.mark.parametrize("ref", ["zeroshot", "start"])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.25])
def test_wise_merge_hooks_blend_trained_and_reference(ref, alpha):
    g = torch.Generator().manual_seed(4)
    model = Toy()
    zeroshot = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    run = fake_run(model, "--wise-merge", "--wise-ref", ref, "--wise-ft-alpha", str(alpha), zeroshot=zeroshot)
    merge = WiseMerge(run.config)
    merge.before_task(run, None)
    start = weights(model)
    fake_step(model, g)
    trained = weights(model)
    merge.after_task(run, None)
    reference = zeroshot if ref == "zeroshot" else start
    got = weights(model)
    for n in got:
        if alpha == 0.0:
            assert torch.equal(got[n], reference[n]), n
        elif alpha == 1.0:
            assert torch.equal(got[n], trained[n]), n
        else:
            torch.testing.assert_close(got[n], alpha * trained[n] + (1 - alpha) * reference[n])


@pytest.mark.parametrize("alpha", ["0", "1"])
def test_wise_merge_in_a_run(alpha, tmp_path, monkeypatch):
    """``--wise-merge --wise-ft-alpha 0``: the task's saved result is exactly the zero-shot model; alpha 1: exactly
    the weights training ended with."""
    ended = []
    original = WiseMerge.after_task

    def after_task(self, run, task):
        ended.append({n: p.detach().clone() for n, p in run.model.named_parameters()})
        original(self, run, task)

    monkeypatch.setattr(WiseMerge, "after_task", after_task)
    assert main([*FAST, "--wise-merge", "--wise-ft-alpha", alpha, "--train-dataset", "ToyShape", "--iterations", "2",
                 "--eval-datasets", "ToyShape", "--save", str(tmp_path)]) == 0
    result, zeroshot = load(tmp_path / "ToyShape.pth")["model"], zeroshot_micro()
    [trained] = ended
    assert not torch.equal(trained["visual.conv1.weight"], zeroshot["visual.conv1.weight"])
    want = zeroshot if alpha == "0" else trained
    for name in zeroshot:
        assert torch.equal(result[name], want[name]), name


def test_components_order_averages_before_the_wise_merge():
    """WE produces the task's weights, then WiSE blends them: ``build_components`` keeps that order."""
    config = parse_args(["--train-dataset", "ToyShape", "--method", "lwf", "--l2", "1", "--we", "--wise-merge"])
    assert [c.name for c in build_components(config)] == ["lwf", "l2", "we", "wise_merge"]
    config = parse_args(["--train-dataset", "ToyShape", "--ema", "0.9", "--wise-merge"])
    assert [c.name for c in build_components(config)] == ["finetune", "ema", "wise_merge"]


# ------------------------------------------------------------------------------------------------ eval-time WiSE-FT


def results(save: Path) -> dict[tuple, tuple[float, float]]:
    lines = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines()]
    return {(r.get("after_task"), r["dataset"]): (r["top1"], r["top5"]) for r in lines}


def test_eval_time_wise_ft_endpoints(tmp_path, monkeypatch):
    """``--eval-only --load CKPT --wise-ft --alpha 0`` evaluates exactly the zero-shot weights (same accuracy as
    the run's zero-shot row and as ``--eval-only`` of the base model); ``--alpha 1`` exactly the checkpoint."""
    evaluated: list[dict[str, torch.Tensor]] = []
    original_init = ZeroShotEvaluator.__init__

    def init(self, model, *args, **kwargs):
        original_init(self, model, *args, **kwargs)
        evaluated.append(model)

    monkeypatch.setattr(ZeroShotEvaluator, "__init__", init)
    datasets = ["--eval-datasets", "ToyShape,ToyColor"]
    train = tmp_path / "train"
    assert main([*FAST, "--lr", "3e-3", "--train-dataset", "ToyShape", "--iterations", "6", *datasets,
                 "--save", str(train)]) == 0
    trained = results(train)
    ckpt = train / "ToyShape.pth"
    names = ("ToyShape", "ToyColor")
    zero_shot = {n: trained[(0, n)] for n in names}
    after = {n: trained[(1, n)] for n in names}
    assert zero_shot != after  # else the comparisons below could not tell the two weights apart

    def evaluate(save: Path, *flags: str) -> tuple[dict[str, tuple[float, float]], dict[str, torch.Tensor]]:
        evaluated.clear()
        evaluation_flags = FAST[:2] + FAST[8:]  # --eval-only refuses training flags (--lr, ...)
        assert main([*evaluation_flags, "--eval-only", *datasets, *flags, "--save", str(save)]) == 0
        [model] = evaluated
        rows = results(save)
        return {n: rows[(None, n)] for n in names}, {k: v.detach().clone() for k, v in model.state_dict().items()}

    base, base_weights = evaluate(tmp_path / "base")
    alpha0, alpha0_weights = evaluate(tmp_path / "alpha0", "--load", str(ckpt), "--wise-ft", "--alpha", "0")
    alpha1, alpha1_weights = evaluate(tmp_path / "alpha1", "--load", str(ckpt), "--wise-ft", "--alpha", "1")
    plain, _ = evaluate(tmp_path / "plain", "--load", str(ckpt))
    assert base == zero_shot and alpha0 == zero_shot
    assert alpha1 == after and plain == after

    zeroshot, saved = zeroshot_micro(), load(ckpt)["model"]
    for name in zeroshot:
        assert torch.equal(alpha0_weights[name], zeroshot[name]), name
        assert torch.equal(alpha1_weights[name], saved[name]), name
        assert torch.equal(base_weights[name], zeroshot[name]), name
