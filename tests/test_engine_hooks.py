"""The engine's hooks for new methods, proved by their properties: --precision, --optimizer sgd with OGD, the
head protocol under --eval-only, learning-rate multipliers, and a resume that forgives how a path was typed."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtil.args import parse_args
from mtil.datasets.toyworld import ToyTaskDataset
from mtil.engine.precision import autocast
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods.ogd import load_basis
from mtil.models.clip_loading import load_clip
from mtil.models.heads import LinearHead, ZeroShotHead, head_from_state, head_state
from mtil.models.text import tokenize
from tests.helpers import load, run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------ precision
def _clip_loss(model, images, tokens) -> torch.Tensor:
    logits, _ = model(images, tokens)
    targets = torch.arange(len(images))
    return F.cross_entropy(logits.float(), targets)


def test_a_bf16_step_is_close_to_the_fp32_step():
    """Same weights, same batch: the bf16 loss is within 2% of fp32's, and so is the update it makes."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    results = {}
    for precision in ("fp32", "bf16"):
        model = load_clip("micro-vit", seed=0).model.train()
        tokens = tokenize(model, ["a red square", "a blue circle", "a green star", "a yellow heart"])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with autocast(precision, torch.device("cpu")):
            loss = _clip_loss(model, images, tokens)
        assert loss.dtype == torch.float32  # losses stay fp32
        loss.backward()
        optimizer.step()
        assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
        results[precision] = (loss.item(), model.visual.proj.detach().clone())
    (loss32, w32), (loss16, w16) = results["fp32"], results["bf16"]
    assert loss16 != loss32  # bf16 really ran
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert torch.allclose(w16, w32, rtol=0, atol=0.02 * w32.abs().max().item())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_exact_within_one_precision(precision, tmp_path, monkeypatch):
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 48)
    argv = [*FAST, "--precision", precision, "--train-dataset", "ToyShape,ToyColor", "--iterations", "4",
            "--checkpoint-interval", "2", "--eval-datasets", "ToyShape,ToyColor"]
    assert main([*argv, "--save", str(tmp_path / "straight")]) == 0
    run_killed_at(monkeypatch, [*argv, "--save", str(tmp_path / "killed")], ["ToyShape"], 3)
    saved = load(tmp_path / "killed" / "latest.pth")
    assert saved["state"]["step"] == 2 and ("scaler" in saved) == (precision == "fp16")
    assert main([*argv, "--save", str(tmp_path / "killed")]) == 0
    want, got = load(tmp_path / "straight" / "ToyColor.pth"), load(tmp_path / "killed" / "ToyColor.pth")
    for key in want["model"]:
        assert torch.equal(got["model"][key], want["model"][key]), key
    pd.testing.assert_frame_equal(mx.read_matrix(tmp_path / "killed" / "accuracy_matrix.csv"),
                                  mx.read_matrix(tmp_path / "straight" / "accuracy_matrix.csv"), check_exact=True)
    fp32 = tmp_path / "fp32"
    assert main([*[a for a in argv if a not in ("--precision", precision)], "--save", str(fp32)]) == 0
    other = load(fp32 / "ToyColor.pth")["model"]
    assert any(not torch.equal(other[k], want["model"][k]) for k in other)  # the precision really acted


# ------------------------------------------------------------------------------------------------ optimiser
def _orthogonality(save, optimizer_flags: list[str]) -> float:
    """max over tracked weights of |B (W_after_task2 - W_after_task1)| / |W_after_task2 - W_after_task1|."""
    flags = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "6", "--orthogonal-gradients", "3",
             "--ogd-energy", "1", "--eval-datasets", "ToyShape", *optimizer_flags, "--save", str(save)]
    assert main(flags) == 0
    basis, tasks = load_basis(save / "grad_ToyShape.pth")
    assert tasks == ["ToyShape"]
    first, second = load(save / "ToyShape.pth")["model"], load(save / "ToyColor.pth")["model"]
    worst = 0.0
    for name, b in basis.items():
        delta = (second[name] - first[name]).flatten().double()
        assert delta.norm() > 0, name
        worst = max(worst, ((b.double() @ delta).norm() / delta.norm()).item())
    return worst


def test_sgd_with_ogd_makes_the_update_itself_orthogonal(tmp_path):
    """Plain SGD moves the weights along the projected gradient: orthogonal to the earlier task's basis. AdamW
    rescales coordinates, so its update is not (which is why OGD's paper uses SGD)."""
    assert _orthogonality(tmp_path / "sgd", ["--optimizer", "sgd", "--lr", "0.5", "--warmup-length", "0"]) < 1e-4
    assert _orthogonality(tmp_path / "adamw", []) > 1e-2


def _record_construction(monkeypatch, optimizer_class) -> list[tuple[list, dict]]:
    """(param groups, keyword arguments) of every ``optimizer_class`` built while the test runs."""
    built = []
    original = optimizer_class.__init__

    def record(self, params, **kwargs):
        built.append((params, kwargs))
        original(self, params, **kwargs)

    monkeypatch.setattr(optimizer_class, "__init__", record)
    return built


def test_sgd_momentum_reaches_the_optimizer(tmp_path, monkeypatch):
    built = _record_construction(monkeypatch, torch.optim.SGD)
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", "--optimizer", "sgd",
                 "--momentum", "0.9", "--wd", "0.01"]) == 0
    assert built and built[0][1]["momentum"] == 0.9 and built[0][1]["weight_decay"] == 0.01


def test_lr_multipliers_make_one_group_per_part(tmp_path, monkeypatch):
    built = _record_construction(monkeypatch, torch.optim.AdamW)
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", "--train-mode", "image-fc",
                 "--lr-multipliers", "head=10"]) == 0
    lrs = {g["part"]: g["initial_lr"] for g in built[0][0]}  # "lr" itself follows the schedule
    assert lrs == {"image": 1e-3, "head": pytest.approx(1e-2)}


def test_a_method_can_bring_its_own_optimizer(tmp_path, monkeypatch):
    from mtil import registry
    from mtil.methods.finetune import Finetune

    class PlainSGD(Finetune):
        name = "plain-sgd"
        summary = "test"

        def optimizer(self, run, task, groups):
            return torch.optim.SGD(groups, lr=task.settings.lr)

    monkeypatch.setitem(registry._REGISTRY, PlainSGD.name, PlainSGD)
    stepped = []
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: stepped.append("sgd"))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: stepped.append("adamw"))
    assert main([*FAST, "--method", "plain-sgd", "--train-dataset", "ToyShape", "--iterations", "2"]) == 0
    assert stepped == ["sgd", "sgd"]


# ------------------------------------------------------------------------------------------------ heads
def test_heads_round_trip_through_checkpoint_entries():
    weight = torch.randn(5, 8)
    linear = LinearHead(weight, torch.randn(5))
    zero = ZeroShotHead(torch.randn(8, 5))
    x = torch.randn(3, 8)
    for head in (linear, zero):
        entry = head_state(head)
        assert set(entry) == {"kind", "tensors"}
        assert torch.equal(head_from_state(entry)(x), head(x))
    legacy = {"linear.weight": weight, "linear.bias": torch.zeros(5)}  # checkpoints before heads had kinds
    assert torch.equal(head_from_state(legacy)(x), LinearHead(weight)(x))
    with pytest.raises(ValueError, match="unknown head kind"):
        head_from_state({"kind": "cache", "tensors": {}})


@pytest.mark.parametrize("mode", ["image-fc", "fc"])
def test_eval_only_of_a_linear_head_checkpoint_equals_the_last_row(mode, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 48)
    save = tmp_path / "run"
    assert main([*FAST, "--train-mode", mode, "--train-dataset", "ToyShape,ToyColor", "--iterations", "30",
                 "--lr", "1e-2", "--max-evaluation-size", "40", "--save", str(save)]) == 0
    long = mx.read_matrix(save / "accuracy_matrix.csv")
    last = {r.dataset: r.top1 for r in long.itertuples() if r.after_task == 2}
    capsys.readouterr()
    assert main(["--model", "micro-vit", "--workers", "0", "--device", "cpu", "--eval-only", "--load",
                 str(save / "ToyColor.pth"), "--eval-datasets", "ToyShape,ToyColor", "--max-evaluation-size", "40",
                 "--save", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "learned head" in out and "classes, 40 images" in out
    evaluated = {r.dataset: r.top1 for r in pd.read_json(tmp_path / "eval" / "results.jsonl", lines=True)
                 .itertuples()}
    assert evaluated == pytest.approx(last, abs=1e-9)
    # Without the learned heads (zero-shot heads on the same weights) the numbers differ: the head mattered.
    monkeypatch.setattr("mtil.jobs._learned_heads", lambda loaded, device: {})
    assert main(["--model", "micro-vit", "--workers", "0", "--device", "cpu", "--eval-only", "--load",
                 str(save / "ToyColor.pth"), "--eval-datasets", "ToyShape,ToyColor", "--max-evaluation-size", "40",
                 "--save", str(tmp_path / "zeroshot-heads")]) == 0
    plain = {r.dataset: r.top1 for r in pd.read_json(tmp_path / "zeroshot-heads" / "results.jsonl", lines=True)
             .itertuples()}
    assert plain != pytest.approx(last, abs=1e-9)


# ------------------------------------------------------------------------------------------------ resume and paths
def test_a_finished_run_is_recognised_whatever_the_form_of_its_paths(tmp_path, monkeypatch, capsys):
    """Relative vs absolute --load and --save are the same files: the finished run is shown, not refused."""
    start = tmp_path / "start"
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", "--save", str(start)]) == 0
    monkeypatch.chdir(tmp_path)
    argv = [*FAST, "--train-dataset", "ToyColor", "--iterations", "2", "--eval-datasets", "ToyColor"]
    assert main([*argv, "--load", "start/ToyShape.pth", "--save", "run"]) == 0
    capsys.readouterr()
    assert main([*argv, "--load", str(start / "ToyShape.pth"), "--save", str(tmp_path / "run")]) == 0
    assert "already holds this finished run" in capsys.readouterr().out
    monkeypatch.chdir(start)
    assert main([*argv, "--load", "./ToyShape.pth", "--save", "../run"]) == 0
    assert "already holds this finished run" in capsys.readouterr().out


def test_the_refusal_lists_only_real_differences_with_their_values(tmp_path, monkeypatch, capsys):
    argv = [*FAST, "--train-dataset", "ToyShape", "--iterations", "4", "--checkpoint-interval", "2"]
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*argv, "--save", str(save)], [], 3)
    monkeypatch.chdir(tmp_path)
    # another --workers, --device spelling of the same folder: not differences; --lr is
    changed = [a if a != "1e-3" else "2e-3" for a in argv]
    assert main([*changed, "--save", "run", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    listed = err.split("saved -> now: ", 1)[1].split(")", 1)[0]
    assert listed == "--lr 0.001 -> 0.002", err


def test_parse_args_records_what_the_user_typed():
    config = parse_args(["--train-dataset", "ToyShape", "--iterations", "3", "--lr", "1e-5"])
    assert "lr" in config._cli and "iterations" in config._cli and "wd" not in config._cli
