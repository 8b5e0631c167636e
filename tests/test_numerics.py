"""The numerical guard: a NaN or infinite loss or gradient never reaches the weights or a checkpoint. The run
stops with one line and exit code 2, leaving the checkpoints already written byte for byte as they were, or skips
such steps up to ``--skip-nonfinite N``."""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pytest
import torch

from mtil.engine.numerics import EXPLOSION_FACTOR, NonFiniteError, NonFiniteGuard, WeightsGuard, all_finite
from mtil.main import main
from mtil.methods.finetune import Finetune
from tests.helpers import load

FAST = ["--model", "micro-vit", "--batch-size", "8", "--warmup-length", "1", "--max-evaluation-size", "16",
        "--workers", "0", "--device", "cpu", "--checkpoint-interval", "0"]


def _losses(value: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    losses = {"ce": torch.tensor(value), "l2": torch.tensor(0.5)}
    return losses, sum(losses.values())


def test_a_non_finite_loss_stops_with_the_step_and_the_terms():
    guard = NonFiniteGuard(limit=0)
    assert guard.problem(*_losses(1.0), gradients=[torch.ones(3)]) is None
    problem = guard.problem(*_losses(math.nan), gradients=[torch.ones(3)])
    assert "loss is not finite" in problem and "ce nan" in problem and "l2 0.5" in problem
    with pytest.raises(NonFiniteError, match=r"ToyColor step 3/10: the loss is not finite .*--skip-nonfinite"):
        guard.allow_skip(problem, "ToyColor step 3/10")


def test_non_finite_gradients_are_caught_except_under_the_fp16_scaler():
    guard = NonFiniteGuard(limit=0)
    bad = [torch.ones(3), torch.tensor([1.0, math.inf])]
    assert "gradients are not finite" in guard.problem(*_losses(1.0), gradients=bad)
    assert guard.problem(*_losses(1.0), gradients=None) is None  # fp16: the scaler skips such steps itself
    assert not all_finite([torch.tensor([math.nan])]) and all_finite([torch.zeros(2), torch.arange(3)])


def test_skips_are_counted_against_the_limit_and_then_stop():
    guard = NonFiniteGuard(limit=2, skipped=1)  # one skipped before a resume
    assert guard.allow_skip("the loss is not finite", "T step 1/5")
    assert guard.skipped == 2
    with pytest.raises(NonFiniteError, match="--skip-nonfinite 2 steps already skipped"):
        guard.allow_skip("the loss is not finite", "T step 2/5")


def test_non_finite_weights_are_never_written():
    guard = WeightsGuard()
    with pytest.raises(NonFiniteError, match="not writing a checkpoint: weight b is not finite"):
        guard.check([("a", torch.zeros(2)), ("b", torch.tensor([0.0, math.nan])), ("n", torch.arange(2))],
                    "a checkpoint")
    with pytest.raises(NonFiniteError, match="weight b is not finite"):
        guard.check([("a", torch.zeros(2)), ("b", torch.tensor([-math.inf]).to(torch.bfloat16))], "a checkpoint")
    guard.check([("a", torch.zeros(2)), ("n", torch.arange(2)), ("e", torch.zeros(0))], "a checkpoint")


def test_exploded_weights_are_named_against_their_start():
    """Weights whose 2-norm overflows float32 failed the fused check while no element was NaN or inf, and naming
    the culprit ended in StopIteration (issue 24: --lr 1e20); finite weights of 1e20 were saved. The bound is
    EXPLOSION_FACTOR x max(1, the tensor's largest |value| at the start)."""
    guard = WeightsGuard({"big": torch.full((4,), 1e15), "small": torch.tensor([0.5, -0.25])})
    with pytest.raises(NonFiniteError, match=r"weight b has exploded \(largest \|value\| 3e\+30"):
        guard.check([("small", torch.ones(3)), ("b", torch.full((64,), 3e30)), ("c", torch.tensor([math.nan]))],
                    "a checkpoint")
    guard.check([("big", torch.full((64,), 1e18)), ("small", torch.full((2,), -0.99 * EXPLOSION_FACTOR))], "x")
    with pytest.raises(NonFiniteError, match=r"weight small has exploded .* max\(1, 0.5\)"):
        guard.check([("small", torch.tensor([0.0, -1.01 * EXPLOSION_FACTOR]))], "a checkpoint")
    with pytest.raises(NonFiniteError, match="weight new has exploded"):  # no start (a head): the bound of 1
        guard.check([("new", torch.tensor([2 * EXPLOSION_FACTOR]))], "a checkpoint")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_an_exploding_task_stops_the_run_and_keeps_the_good_checkpoints(tmp_path, capsys):
    sequence = tmp_path / "sequence.yaml"
    sequence.write_text("tasks:\n  - {dataset: ToyShape, iterations: 2, lr: 1.0e-3}\n"
                        "  - {dataset: ToyColor, iterations: 4, lr: 1.0e+30}\n")
    save = tmp_path / "run"
    argv = [*FAST, "--sequence", str(sequence), "--save", str(save)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ToyColor step" in err[0] and "not finite" in err[0], err
    assert not (save / "ToyColor.pth").exists()
    latest, first = load(save / "latest.pth"), load(save / "ToyShape.pth")
    assert latest["state"]["completed"] == ["ToyShape"]
    assert all(torch.isfinite(v).all() for v in latest["model"].values() if v.is_floating_point())
    assert all(torch.equal(latest["model"][k], v) for k, v in first["model"].items())
    before = _digests(save)
    # Run again, and again allowing two skipped steps: each stops the same way and writes nothing.
    assert main(argv) == 2
    assert main([*argv, "--skip-nonfinite", "2"]) == 2
    assert "2 steps already skipped" in capsys.readouterr().err
    after = _digests(save)
    assert {k: v for k, v in after.items() if k.endswith(".pth")} == {k: v for k, v in before.items()
                                                                      if k.endswith(".pth")}


def test_a_transient_non_finite_step_is_skipped_when_allowed(tmp_path, monkeypatch):
    original = Finetune.loss
    calls = {"n": 0}

    def loss_nan_once(self, run, batch):
        losses = original(self, run, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            losses["ce"] = losses["ce"] * math.nan
        return losses

    monkeypatch.setattr(Finetune, "loss", loss_nan_once)
    save = tmp_path / "run"
    assert main([*FAST, "--train-dataset", "ToyColor", "--iterations", "3", "--lr", "1e-3",
                 "--skip-nonfinite", "1", "--save", str(save)]) == 0
    checkpoint = load(save / "latest.pth")
    assert checkpoint["state"]["nonfinite_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert "step skipped (1 of --skip-nonfinite 1 used)" in (save / "train.log").read_text()


@pytest.mark.parametrize("flags", [
    ["--lr", "1e6"],
    ["--lr", "1e20"],
    ["--lr", "1e20", "--precision", "bf16"],
    ["--lr", "1e20", "--skip-nonfinite", "1"],
    ["--lr", "3e38"],
    ["--l2", "3e38"],
    ["--lora", "--lora-alpha", "1e30"],
    ["--method", "ZSCL", "--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions",
     "--ref-sentences-count", "20", "--T", "1e30"],
], ids=["huge-lr", "lr-1e20", "lr-1e20-bf16", "lr-1e20-skip", "lr-3e38-optimizer-overflow", "huge-l2",
        "huge-lora-alpha", "huge-T"])
def test_every_exploding_setting_stops_at_its_step_and_writes_only_finite_weights(flags, tmp_path, capsys):
    """The settings the original trained on to the end with NaN: each stops with one line and exit code 2."""
    save = tmp_path / "run"
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "3", *flags, "--save", str(save)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ToyShape step" in err[0] and "not finite" in err[0], err
    assert not (save / "ToyShape.pth").exists()
    for path in save.glob("*.pth"):
        weights = load(path)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), path.name


@pytest.mark.parametrize("argv, culprit", [
    (["--method", "embedding-adapter", "--train-dataset", "ToyColorA", "--shots", "4", "--iterations", "3",
      "--lr", "1e20", "--warmup-length", "1", "--batch-size", "8"], r"heads/ToyColorA/tensors/\S+ has exploded"),
    (["--method", "tip-adapter-f", "--train-dataset", "ToyColorB", "--shots", "2", "--tip-lr", "1e20"],
     r"heads/ToyColorB/tensors/keys is not finite"),
])
def test_a_head_trained_to_nonsense_is_never_saved(argv, culprit, tmp_path, capsys):
    """Tip-Adapter-F at --tip-lr 1e20 saved all-NaN keys, the embedding adapter at --lr 1e20 weights of 1.9e20,
    and both exited 0 at chance. Now the checkpoint after the task is refused in one line, exit 2: latest.pth stays
    the zero-shot one and no task row is recorded."""
    save = tmp_path / "run"
    assert main(["--model", "micro-vit", "--max-evaluation-size", "24", "--workers", "0", "--device", "cpu",
                 "--log-every", "0", *argv, "--save", str(save)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(culprit, err[0]) and "Traceback" not in err[0], err
    assert load(save / "latest.pth")["state"]["completed"] == []
    assert not list(save.glob("ToyColor*.pth"))


def test_the_explosion_bound_is_the_same_after_a_resume(tmp_path, monkeypatch):
    """The bounds come from the zero-shot weights, not from the weights the process starts with (found in review:
    each resume or chain link allowed another 1e4x)."""
    from mtil.engine import numerics
    from tests.helpers import run_killed_at

    starts: list[dict] = []
    original = numerics.WeightsGuard.__init__

    def recording(self, start=None):
        original(self, start)
        if self.start:
            starts.append(dict(self.start))

    monkeypatch.setattr(numerics.WeightsGuard, "__init__", recording)
    argv = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "6", "--batch-size", "8",
            "--lr", "1e-2", "--warmup-length", "1", "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu",
            "--checkpoint-interval", "2", "--save", str(tmp_path / "run")]
    run_killed_at(monkeypatch, argv, [], 5)
    assert main(argv) == 0
    assert len(starts) == 2 and starts[0] == starts[1]


def test_half_precision_weights_are_checked_in_float32():
    """Found in review: the fused norm of an fp16 tensor is fp16 and overflows at 65 504, so a finite tensor was
    refused as exploded and the first tensor named instead."""
    from mtil.finite import first_nonfinite

    assert first_nonfinite([("a.weight", torch.zeros(3, dtype=torch.float16)),
                            ("running_var", torch.full((2048,), 2000.0, dtype=torch.float16))]) is None
    assert first_nonfinite([("a", torch.ones(3, dtype=torch.bfloat16)),
                            ("b", torch.tensor([math.nan], dtype=torch.float16))]) == "b is not finite"
