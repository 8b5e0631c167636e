"""Metric files are derived data: a damaged ``metrics_<Dataset>.csv`` or ``accuracy_matrix.csv`` in a folder being
resumed is rebuilt from ``results.jsonl`` (with a warning), a torn ``results.jsonl`` line never swallows the next
record, and ``--summarize`` on a damaged or binary file is one line, not a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtil.evaluation.matrix import matrix_from_results
from mtil.evaluation.metrics_io import append_result_line, read_metrics
from mtil.main import main
from tests.helpers import run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
BASE = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "4", "--checkpoint-interval", "2"]
GARBAGE = b"\xff\xfe\x00 not,a\ncsv\n"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("whole") / "run"
    assert main([*BASE, "--save", str(save)]) == 0
    return save


@pytest.mark.parametrize("damaged", ["metrics_ToyShape.csv", "accuracy_matrix.csv"])
def test_a_damaged_metric_file_is_rebuilt_on_resume(damaged, tmp_path, monkeypatch, capsys, uninterrupted):
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*BASE, "--save", str(save)], ["ToyShape"], 3)
    (save / damaged).write_bytes(GARBAGE)
    assert main([*BASE, "--save", str(save)]) == 0
    assert "is damaged" in capsys.readouterr().err
    for name in ("metrics_ToyShape.csv", "metrics_ToyColor.csv", "accuracy_matrix.csv"):
        assert (save / name).read_text() == (uninterrupted / name).read_text(), name


def test_a_torn_results_line_does_not_swallow_the_next_record(tmp_path):
    first = {"dataset": "A", "iteration": 0, "after_task": 0, "sequence": [], "top1": 10.0, "top5": 50.0}
    append_result_line(tmp_path, first, {})
    with (tmp_path / "results.jsonl").open("a") as handle:
        handle.write('{"dataset": "A", "iteration": 4, "after_ta')  # a crash mid-write
    second = {"dataset": "A", "iteration": 4, "after_task": 1, "sequence": ["A"], "top1": 80.0, "top5": 99.0}
    append_result_line(tmp_path, second, {})
    with pytest.warns(UserWarning, match="undecodable"):
        long, order = matrix_from_results(tmp_path / "results.jsonl")
    assert order == ["A"] and sorted(long["top1"]) == [10.0, 80.0]


def test_a_damaged_metrics_file_without_results_gives_no_rows(tmp_path):
    path = tmp_path / "metrics_A.csv"
    path.write_bytes(GARBAGE)
    assert read_metrics(path) == {}


def test_summarize_on_damaged_results_is_one_line(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_bytes(b"\x00\x01\xff binary")
    assert main(["--summarize", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no after-task evaluations" in err[0]


def test_summarize_skips_a_record_with_a_bad_after_task(tmp_path, capsys):
    good = {"dataset": "ToyShape", "iteration": 4, "after_task": 1, "sequence": ["ToyShape"], "top1": 50.0,
            "top5": 90.0, "method": "finetune"}
    bad = {**good, "after_task": "first"}
    (tmp_path / "results.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.warns(UserWarning, match="valid after_task"):
        assert main(["--summarize", str(tmp_path)]) == 0
    assert (tmp_path / "accuracy_matrix.csv").is_file()
