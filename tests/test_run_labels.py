"""Runs are told apart: summary.csv, results.jsonl, the tables and plots call a run by its method and the
components that change what it computes (issue 25: EMA, WE, LoRA and OGD runs were all called "finetune")."""
from __future__ import annotations

import csv
import json

import pytest

from mtil import registry
from mtil.args import parse_args
from mtil.engine.method import run_label
from mtil.main import main

BASE = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "2"]


@pytest.mark.parametrize(("extra", "label"), [
    ([], "finetune"),
    (["--ema"], "finetune+ema"),
    (["--we"], "finetune+we"),
    (["--method", "ZSCL", "--we", "--l2", "1"], "ZSCL+l2+we"),
    (["--lora"], "finetune+lora"),
    (["--lora", "--lora-shared"], "finetune+shared-lora"),
    (["--orthogonal-gradients", "2"], "finetune+ogd"),
    (["--lr-mult-vision", "0.5"], "finetune"),  # a learning rate, not a method
    (["--method", "lwf"], "lwf"),
])
def test_the_label_names_the_method_and_its_components(extra, label):
    args = parse_args([*BASE, *extra])
    assert run_label(registry.build_components(args), args) == label


def test_summary_and_results_carry_the_label(tmp_path):
    save = tmp_path / "run"
    assert main([*BASE, "--ema", "--batch-size", "8", "--max-evaluation-size", "16", "--workers", "0",
                 "--device", "cpu", "--save", str(save)]) == 0
    with open(save / "summary.csv") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["finetune+ema"]
    records = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"finetune+ema"}
    assert main(["--summarize", str(save)]) == 0  # the summary written again from the journal keeps it
    with open(save / "summary.csv") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["finetune+ema"]
