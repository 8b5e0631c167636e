"""--report: the metrics against hand computation, the files read back to the same numbers, and whole runs that
write them (zero-shot, a short fine-tune with its baseline and chart, --eval-only, a finished run re-run)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtil.evaluation import report as rp
from mtil.main import main

CLASSES = ["apple", "bear, brown", "cat"]  # a comma in a name: the CSV files must quote it
# 10 images by hand: true A x4 -> A A A B; true B x3 -> B B A; true C x3 -> C A B
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDICTED = [0, 0, 0, 1, 1, 1, 0, 2, 0, 1]


def one_hot_logits(predicted: list[int], classes: int) -> torch.Tensor:
    """Logits whose best class is ``predicted`` (the others below it, in a fixed order)."""
    logits = -torch.arange(classes, dtype=torch.float32).repeat(len(predicted), 1) / 10
    logits[torch.arange(len(predicted)), torch.tensor(predicted)] = 5.0
    return logits


def hand_report() -> rp.ClassificationReport:
    return rp.classification_report(one_hot_logits(PREDICTED, 3), torch.tensor(LABELS), CLASSES)


# ---------------------------------------------------------------------------------------------- the numbers
def test_confusion_matrix_rows_are_true_classes_columns_predicted():
    assert hand_report().confusion.tolist() == [[3, 1, 0], [1, 2, 0], [1, 1, 1]]


def test_per_class_and_averages_match_the_hand_computation():
    """Columns sum to 5, 4, 1 predictions; rows to 4, 3, 3 images.
    precision 3/5, 2/4, 1/1; recall 3/4, 2/3, 1/3; F1 2/3, 4/7, 1/2."""
    report = hand_report()
    table = {row["class"]: row for row in report.rows()}
    expected = {"apple": (4, 60.0, 75.0, 200 / 3), "bear, brown": (3, 50.0, 200 / 3, 400 / 7),
                "cat": (3, 100.0, 100 / 3, 50.0)}
    for name, (support, precision, recall, f1) in expected.items():
        assert table[name]["support"] == support
        assert table[name]["precision"] == pytest.approx(precision)
        assert table[name]["recall"] == pytest.approx(recall)
        assert table[name]["f1"] == pytest.approx(f1)
    metrics = report.metrics()
    assert metrics["top1"] == 60.0
    assert metrics["precision_macro"] == pytest.approx(70.0)  # (60 + 50 + 100) / 3
    assert metrics["recall_macro"] == pytest.approx(175 / 3)  # (75 + 66.67 + 33.33) / 3
    assert metrics["f1_macro"] == pytest.approx(100 * 73 / 126)  # (2/3 + 4/7 + 1/2) / 3 = (28 + 24 + 21) / 126
    assert metrics["precision_weighted"] == pytest.approx(69.0)  # (4 * 60 + 3 * 50 + 3 * 100) / 10
    assert metrics["recall_weighted"] == pytest.approx(60.0)  # (3 + 2 + 1) / 10: weighted recall is accuracy
    assert metrics["f1_weighted"] == pytest.approx(100 * 247 / 420)  # (4 * 2/3 + 3 * 4/7 + 3 * 1/2) / 10
    assert report.images == 10


def test_top_k_on_hand_made_logits_with_k_capped_at_the_classes():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0],   # label 0: rank 1
                           [4.0, 3.0, 2.0, 1.0],   # label 2: rank 3
                           [1.0, 2.0, 3.0, 4.0],   # label 0: rank 4
                           [0.1, 0.5, 0.2, 0.3]])  # label 3: rank 2
    labels = torch.tensor([0, 2, 0, 3])
    assert rp.top_k_accuracy(logits, labels) == {1: 25.0, 3: 75.0, 5: 100.0}  # 4 classes: top-5 is top-4
    assert rp.top_k_accuracy(logits[:, :3], torch.tensor([0, 2, 0, 1]))[5] == 100.0
    two = rp.top_k_accuracy(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 0]))
    assert two == {1: 50.0, 3: 100.0, 5: 100.0}


def test_a_class_never_predicted_has_precision_zero_and_counts_in_the_macro_mean():
    report = rp.classification_report(one_hot_logits([0, 0, 1, 1, 0, 1], 3), torch.tensor([0, 0, 1, 1, 2, 2]),
                                      ["a", "b", "c"])
    c = report.rows()[2]
    assert (c["support"], c["precision"], c["recall"], c["f1"]) == (2, 0.0, 0.0, 0.0)
    # a: 2 of 3 predicted right, b: 2 of 3; c: 0. Macro precision (2/3 + 2/3 + 0) / 3
    assert report.metrics()["precision_macro"] == pytest.approx(100 * 4 / 9)
    assert report.metrics()["recall_macro"] == pytest.approx(100 * 2 / 3)


def test_a_class_without_images_is_left_out_of_the_macro_mean():
    """Only a sampled evaluation can miss a class: it has no recall to average (but its false alarms stay
    counted as the other classes' misses)."""
    report = rp.classification_report(one_hot_logits([0, 2, 1, 1], 3), torch.tensor([0, 0, 1, 1]), ["a", "b", "c"])
    assert report.rows()[2]["support"] == 0 and report.rows()[2]["precision"] == 0.0
    metrics = report.metrics()
    assert metrics["recall_macro"] == pytest.approx(75.0)  # (50 + 100) / 2, not / 3
    assert metrics["precision_macro"] == pytest.approx(100.0)  # a: 1/1, b: 2/2
    assert metrics["top1"] == 75.0


def test_the_prediction_is_the_evaluators_even_on_ties():
    """A report's top-1 is the evaluator's (the same topk call): equal logits included."""
    logits = torch.zeros(6, 5)
    logits[:3, 1] = 1.0
    labels = torch.tensor([1, 1, 0, 0, 3, 2])
    evaluator_hits = (logits.topk(5, dim=1).indices[:, 0] == labels).sum().item()
    assert rp.classification_report(logits, labels, list("abcde")).topk[1] == 100.0 * evaluator_hits / 6


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6).flatmap(lambda c: st.tuples(
    st.just(c), st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), min_size=1, max_size=40))))
def test_counts_agree_with_a_loop_over_the_images(case):
    """Independent code: per image, count hits and predictions in plain Python, then divide."""
    classes, pairs = case
    labels = [t for t, _ in pairs]
    report = rp.classification_report(one_hot_logits([p for _, p in pairs], classes), torch.tensor(labels),
                                      [f"c{i}" for i in range(classes)])
    for c, row in enumerate(report.rows()):
        hits = sum(1 for t, p in pairs if t == p == c)
        predicted = sum(1 for _, p in pairs if p == c)
        support = sum(1 for t in labels if t == c)
        assert row["support"] == support
        assert row["precision"] == pytest.approx(100 * hits / predicted if predicted else 0.0)
        assert row["recall"] == pytest.approx(100 * hits / support if support else 0.0)
    accuracy = 100 * sum(1 for t, p in pairs if t == p) / len(pairs)
    assert report.metrics()["top1"] == pytest.approx(accuracy)
    assert report.metrics()["recall_weighted"] == pytest.approx(accuracy)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        rp.classification_report(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError):
        rp.classification_report(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------- the files
def test_files_are_written_atomically_and_read_back_to_the_same_numbers(tmp_path):
    report = hand_report()
    written = rp.write_report(tmp_path, report, {"dataset": "Hand", "split": "test", "method": "m"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written) == sorted(
        [rp.CONFUSION_FILE, rp.PER_CLASS_FILE, rp.HEATMAP_FILE, rp.SUMMARY_FILE])  # no temporary left
    assert (tmp_path / rp.HEATMAP_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / rp.CONFUSION_FILE).open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == [rp.CORNER, *CLASSES] and [r[0] for r in rows[1:]] == CLASSES
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == [[3, 1, 0], [1, 2, 0], [1, 1, 1]]
    with (tmp_path / rp.PER_CLASS_FILE).open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [list(r) for r in table][0] == list(rp.PER_CLASS_COLUMNS)
    for read, row in zip(table, report.rows()):
        assert read["class"] == row["class"] and int(read["support"]) == row["support"]
        assert all(float(read[m]) == row[m] for m in ("precision", "recall", "f1"))  # exactly
    summary = json.loads((tmp_path / rp.SUMMARY_FILE).read_text())
    assert summary["metrics"] == report.metrics()
    assert (summary["dataset"], summary["split"], summary["method"], summary["images"]) == ("Hand", "test", "m", 10)
    again, _ = rp.read_report(tmp_path)
    assert again.classnames == CLASSES and np.array_equal(again.confusion, report.confusion)
    assert again.metrics() == report.metrics()


def test_the_heat_map_prints_cell_counts_only_for_few_classes():
    few = rp.confusion_figure(hand_report())
    assert len(few.axes[0].texts) == int((hand_report().confusion > 0).sum())  # one per non-empty cell
    labels = torch.arange(200) % 40
    many = rp.confusion_figure(rp.classification_report(one_hot_logits(labels.tolist(), 40), labels,
                                                        [f"c{i}" for i in range(40)]))
    assert len(many.axes[0].texts) == 0 and len(many.axes[0].get_xticklabels()) == 40
    labels = torch.arange(120) % 120
    crowded = rp.confusion_figure(rp.classification_report(one_hot_logits(labels.tolist(), 120), labels,
                                                           [f"c{i}" for i in range(120)]))
    assert "c7" not in [t.get_text() for t in crowded.axes[0].get_xticklabels()]  # no names beyond 100 classes


def test_the_comparison_chart_needs_the_same_classes(tmp_path):
    report = hand_report()
    baseline = rp.classification_report(one_hot_logits([0] * 10, 3), torch.tensor(LABELS), CLASSES)
    path = rp.write_comparison(tmp_path / "chart.png", baseline, report)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        rp.comparison_figure(rp.classification_report(one_hot_logits([0] * 10, 3), torch.tensor(LABELS),
                                                      ["x", "y", "z"]), report)


# ---------------------------------------------------------------------------------------------- runs
TOY = ["--model", "micro-vit", "--device", "cpu", "--workers", "0", "--threads", "1"]


def matrix_top1(save: Path) -> dict[int, str]:
    """after_task -> top1 text of ToyColorA in accuracy_matrix.csv (4 decimals)."""
    with (save / "accuracy_matrix.csv").open(newline="") as handle:
        return {int(r["after_task"]): r["top1"] for r in csv.DictReader(handle) if r["dataset"] == "ToyColorA"}


def summary(folder: Path) -> dict:
    return json.loads((folder / rp.SUMMARY_FILE).read_text())


def test_a_zero_shot_run_writes_the_report_of_its_last_row(tmp_path, capsys):
    save = tmp_path / "zs"
    assert main([*TOY, "--method", "zeroshot", "--train-dataset", "ToyColorA", "--report", "--save", str(save)]) == 0
    folder = save / "reports" / "ToyColorA"
    for name in (rp.CONFUSION_FILE, rp.PER_CLASS_FILE, rp.HEATMAP_FILE, rp.SUMMARY_FILE):
        assert (folder / name).is_file() and (folder / "baseline" / name).is_file()
    final = summary(folder)
    assert f"{final['metrics']['top1']:.4f}" == matrix_top1(save)[1]
    assert (final["dataset"], final["split"], final["method"], final["model"]) == \
        ("ToyColorA", "test", "zeroshot", "micro-vit")
    assert final["after_task"] == 1 and final["images"] == 1000 and final["classes"] == 4
    assert rp.read_report(folder)[0].confusion.sum() == 1000
    assert "report (final)" in capsys.readouterr().out


def test_only_the_zero_shot_and_the_last_rows_are_reported(tmp_path, capsys):
    save = tmp_path / "two"
    assert main([*TOY, "--method", "zeroshot", "--train-dataset", "ToyColorA,ToyColorB", "--report",
                 "--max-evaluation-size", "100", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert out.count("report (baseline)") == 2 and out.count("report (final)") == 2  # not after task 1
    for name in ("ToyColorA", "ToyColorB"):
        assert summary(save / "reports" / name)["after_task"] == 2
        assert summary(save / "reports" / name / "baseline")["after_task"] == 0


def test_report_changes_no_result(tmp_path):
    """--report only reads (its extra evaluation of all classes under --base-new included): the trained weights
    are bit for bit the same with and without it, which is why it may differ on resume."""
    weights = []
    for report in ([], ["--report"]):
        save = tmp_path / f"run{len(report)}"
        assert main([*TOY, "--train-dataset", "ToyColorA", "--shots", "2", "--fewshot-seed", "3", "--base-new",
                     "--epochs", "1", "--batch-size", "1", "--warmup-length", "1", "--max-evaluation-size", "8",
                     "--log-every", "0", "--save", str(save), *report]) == 0
        weights.append(torch.load(save / "ToyColorA.pth", map_location="cpu", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (tmp_path / "run1" / "reports" / "ToyColorA" / rp.COMPARISON_FILE).is_file()


def test_a_fine_tune_writes_baseline_and_chart_and_eval_only_reports_the_same_weights(tmp_path):
    save = tmp_path / "ft"
    common = [*TOY, "--max-evaluation-size", "200", "--save", str(save)]
    assert main([*common, "--train-dataset", "ToyColorA", "--iterations", "2", "--batch-size", "8",
                 "--warmup-length", "1", "--lr", "1e-3", "--report"]) == 0
    folder = save / "reports" / "ToyColorA"
    final, baseline = summary(folder), summary(folder / "baseline")
    matrix = matrix_top1(save)
    assert f"{baseline['metrics']['top1']:.4f}" == matrix[0] and baseline["after_task"] == 0
    assert f"{final['metrics']['top1']:.4f}" == matrix[1] and final["iteration"] == 2
    assert (folder / rp.COMPARISON_FILE).read_bytes()[:4] == b"\x89PNG"
    assert final["baseline_chart"] == rp.COMPARISON_FILE and final["images"] == 200

    # --eval-only of the final checkpoint into another folder: its only row is reported, the same numbers
    other = tmp_path / "eval"
    assert main([*TOY, "--max-evaluation-size", "200", "--eval-only", "--load", str(save / "ToyColorA.pth"),
                 "--eval-datasets", "ToyColorA", "--report", "--save", str(other)]) == 0
    evaluated = summary(other / "reports" / "ToyColorA")
    assert evaluated["metrics"] == final["metrics"] and evaluated["method"] == "finetune"
    assert not (other / "reports" / "ToyColorA" / rp.COMPARISON_FILE).exists()  # no baseline there
    # a --wise-ft blend is another model: its report goes beside, as its metric files do
    assert main([*TOY, "--max-evaluation-size", "200", "--eval-only", "--load", str(save / "ToyColorA.pth"),
                 "--wise-ft", "--eval-datasets", "ToyColorA", "--report", "--save", str(other)]) == 0
    assert summary(other / "reports" / "ToyColorA_wiseft0.5")["images"] == 200
    assert summary(other / "reports" / "ToyColorA")["metrics"] == final["metrics"]


def test_a_finished_run_re_run_with_report_writes_the_reports_it_lacks(tmp_path, capsys):
    """--report changes no result, so it may differ on resume; on a finished run it evaluates the final weights."""
    save = tmp_path / "zs"
    argv = [*TOY, "--method", "zeroshot", "--train-dataset", "ToyColorA", "--max-evaluation-size", "100",
            "--save", str(save)]
    assert main(argv) == 0 and not (save / "reports").exists()
    assert main([*argv, "--report"]) == 0
    out = capsys.readouterr().out
    assert "already holds this finished run" in out and "report (final)" in out
    final = summary(save / "reports" / "ToyColorA")
    assert f"{final['metrics']['top1']:.4f}" == matrix_top1(save)[1]
    assert not (save / "reports" / "ToyColorA" / "baseline").exists()


def test_under_base_new_the_report_is_of_all_classes(tmp_path):
    """The matrix cell is on the base classes; the report evaluates the test split over all of them."""
    save = tmp_path / "bn"
    assert main([*TOY, "--method", "zeroshot", "--train-dataset", "ToyColorA", "--base-new", "--report",
                 "--max-evaluation-size", "100", "--save", str(save)]) == 0
    final = summary(save / "reports" / "ToyColorA")
    assert (final["classes"], final["classes_part"], final["images"]) == (4, "all", 100)


@pytest.mark.parametrize("argv, expected", [
    (["--method", "zeroshot", "--train-dataset", "ToyColorA", "--report"], "--save"),
    (["--eval-only", "--report"], "--save"),
    (["--summarize", "somewhere", "--report", "--save", "x"], "--summarize"),
])
def test_report_without_somewhere_to_write_is_a_one_line_error(tmp_path, capsys, argv, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*TOY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--report" in err and expected in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_report_with_eval_single_is_refused(tmp_path, capsys):
    assert main([*TOY, "--eval-single", "x.png", "--class-names", "n.txt", "--report"]) == 2
    assert "--report" in capsys.readouterr().err
