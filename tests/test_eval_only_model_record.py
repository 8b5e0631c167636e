"""What an evaluation of a ``--load`` file records as its model: never ``--model``'s default (found in the docs
review: a toyclip checkpoint evaluated without ``--model`` was recorded as ViT-B/16)."""
from __future__ import annotations

import json

import torch

from mtil.main import main
from mtil.models.clip_loading import load_clip

FAST = ["--eval-only", "--eval-datasets", "ToyShape", "--max-evaluation-size", "20", "--workers", "0",
        "--device", "cpu"]


def _recorded_model(save) -> str:
    rows = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines()]
    return rows[0]["config"]["model"]


def test_an_mtil_checkpoint_records_the_model_its_run_used(tmp_path):
    run = tmp_path / "train"
    assert main(["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "1", "--batch-size", "4",
                 "--max-evaluation-size", "20", "--workers", "0", "--device", "cpu", "--save", str(run)]) == 0
    assert main([*FAST, "--load", str(run / "ToyShape.pth"), "--save", str(tmp_path / "a"), "--report"]) == 0
    assert _recorded_model(tmp_path / "a") == "micro-vit"
    summary = next((tmp_path / "a" / "reports").rglob("summary.json"))
    assert json.loads(summary.read_text())["model"] == "micro-vit"


def test_a_plain_weights_file_is_named_by_its_path_and_a_typed_model_is_kept(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(load_clip("micro-vit", seed=0).model.state_dict(), weights)
    assert main([*FAST, "--load", str(weights), "--save", str(tmp_path / "a")]) == 0
    assert _recorded_model(tmp_path / "a") == f"file {weights}"
    assert main([*FAST, "--model", "micro-vit", "--load", str(weights), "--save", str(tmp_path / "b")]) == 0
    assert _recorded_model(tmp_path / "b") == "micro-vit"
