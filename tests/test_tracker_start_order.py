"""A tracker service that refuses to start (W&B without a login) leaves no file of the other trackers behind: it is
started first (found in the docs review: a TensorBoard event file and an empty W&B journal were left in --save)."""
from __future__ import annotations

import pytest

from mtil.main import main

COMMAND = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "1", "--batch-size", "4",
           "--max-evaluation-size", "10", "--workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("order", ["tensorboard,wandb", "wandb,tensorboard"])
def test_a_wandb_that_cannot_start_leaves_no_tracker_file(order, tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")

    def no_login(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    save = tmp_path / "run"
    assert main([*COMMAND, "--report-to", order, "--save", str(save)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--report-to wandb could not start (UsageError" in lines[0], lines
    left = sorted(str(p.relative_to(save)) for p in save.rglob("*")) if save.exists() else []
    assert left == [], left
    # the same command without W&B then runs in that folder
    assert main([*COMMAND, "--report-to", "tensorboard", "--save", str(save)]) == 0
