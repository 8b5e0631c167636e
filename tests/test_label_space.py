"""--label-space dataset|seen: the union head (by hand), the sequence's matrix in both label spaces, what
results.jsonl records, --eval-only, and the refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtil.evaluation import matrix as mx
from mtil.evaluation.label_space import label_space_of, records_label_space, summary_label, union_datasets
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.errors import UserError
from mtil.main import main
from mtil.models.heads import LinearHead, UnionHead, ZeroShotHead

FAST = ["--model", "toyclip", "--batch-size", "8", "--lr", "1e-4", "--warmup-length", "1", "--iterations", "2",
        "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0", "--device", "cpu"]
TASKS = ["ToyShape", "ToyColor"]
EXTRA = "ToySize"  # evaluated, never trained
CLASSES = {"ToyShape": 8, "ToyColor": 8, "ToySize": 3}


def _one_line_error(capsys, argv, *fragments) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtil: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]


def _cells(folder: Path) -> dict[tuple[int, str], dict]:
    return {(r["after_task"], r["dataset"]): r for r in _records(folder) if r["after_task"] is not None}


# ------------------------------------------------------------------------------------------ the union head by hand


def test_union_head_concatenates_scales_cosines_and_offsets_labels():
    # dataset A: a zero-shot head (cosines), 2 classes; dataset B: a learned linear head (CLIP's scale), 2 classes
    zeroshot_a = ZeroShotHead(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # D x C
    linear_b = LinearHead(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([0.0, 0.2]))  # C x D
    union = UnionHead([("A", zeroshot_a), ("B", linear_b)], scale=2.0, bias=0.5)
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # A's cosines times s plus b beside B's own logits, by hand
    expected = torch.tensor([[2.5, 0.5, 3.0, 0.2], [1.7, 2.1, 1.8, 1.0]])
    assert torch.allclose(union(features), expected)
    assert union.num_classes == 4 and union.offset("A") == 0 and union.offset("B") == 2
    # images of A with labels 0 and 1: among A's classes both are hits; among A's and B's, the first image's
    # best slot is B's class 0 (3.0 > 2.5): a miss
    labels = torch.tensor([0, 1]) + union.offset("A")
    own_top1 = (zeroshot_a(features).argmax(1) == labels).float().mean().item()
    seen_top1 = (union(features).argmax(1) == labels).float().mean().item()
    assert (own_top1, seen_top1) == (1.0, 0.5)
    # a same-named class of two datasets is two slots: equal columns, only the image's own dataset's slot is a hit
    twin = UnionHead([("A", zeroshot_a), ("A2", ZeroShotHead(zeroshot_a.weight.clone()))], scale=1.0)
    assert twin.num_classes == 4 and twin.offset("A2") == 2


def test_union_refuses_heads_with_their_own_encoding():
    from mtil.models.embedding_adapter import EmbeddingAdapterHead
    from mtil.models.heads import joins_union

    assert joins_union(ZeroShotHead(torch.eye(2))) and joins_union(LinearHead(torch.eye(2)))
    assert EmbeddingAdapterHead.union_logits is None
    with pytest.raises(ValueError, match="cannot join"):
        UnionHead([("A", ZeroShotHead(torch.eye(2))),
                   ("B", UnionHead([("C", ZeroShotHead(torch.eye(2))), ("D", ZeroShotHead(torch.eye(2)))]))])


def test_union_layout():
    assert union_datasets("B", []) == ["B"]
    assert union_datasets("B", ["A", "B"]) == ["A", "B"]  # a seen dataset keeps its place
    assert union_datasets("C", ["A", "B"]) == ["A", "B", "C"]  # a dataset not trained yet comes last


def test_evaluator_seen_matches_logits_computed_by_hand(micro):
    """Images of ToyColor (trained second) among ToyShape's (a learned linear head), ToyColor's and ToySize's classes
    (zero-shot heads): top-1 and top-5 from the concatenated logits and the offset labels, by hand."""
    model = micro.model
    evaluator = ZeroShotEvaluator(model, workers=0, batch_size=16, max_size=40, seed=0)
    torch.manual_seed(3)
    learned = LinearHead.from_zeroshot(model, evaluator.task("ToyShape").classnames,
                                       evaluator.task("ToyShape").templates)
    with torch.no_grad():
        learned.linear.weight.add_(torch.randn_like(learned.linear.weight))
    evaluator.learned_heads["ToyShape"] = learned
    seen = ["ToyShape", "ToyColor"]
    captured = []
    evaluator.logits_listeners.append(lambda result, split, part, logits, labels: captured.append((logits, labels)))

    # the evaluator's own features (so that nothing is encoded twice), classified by hand
    features, labels = evaluator.encoded("ToySize", "test", "all", evaluator.head("ToySize"))
    scale = float(model.logit_scale.detach().exp())
    with torch.no_grad():
        blocks = [learned(features), scale * (features @ evaluator.zeroshot_head("ToyColor").weight),
                  scale * (features @ evaluator.zeroshot_head("ToySize").weight)]
    logits = torch.cat(blocks, dim=1)
    truth = labels + CLASSES["ToyShape"] + CLASSES["ToyColor"]  # ToySize's block comes last
    order = logits.argsort(dim=1, descending=True)
    count = truth.numel()
    top1 = 100.0 * (order[:, 0] == truth).sum().item() / count
    top5 = 100.0 * (order[:, :5] == truth[:, None]).any(1).sum().item() / count
    ranked = logits.sort(dim=1, descending=True).values
    tolerance = 100.0 * ((ranked[:, :5] - ranked[:, 1:6]).abs().min(1).values < 1e-4).sum().item() / count

    result = evaluator.evaluate("ToySize", seen=seen)
    assert result.classes == sum(CLASSES.values()) and result.head == "union"
    assert abs(result.top1 - top1) <= tolerance and abs(result.top5 - top5) <= tolerance
    assert torch.equal(captured[-1][1], truth)  # the listeners get the labels in the union's slots
    own = evaluator.evaluate("ToySize")
    assert result.top1 <= own.top1 and result.top5 <= own.top5 and own.classes == CLASSES["ToySize"]
    # the trained datasets' images: their own block is at their offset
    shape = evaluator.evaluate("ToyShape", seen=seen)
    shape_own = evaluator.evaluate("ToyShape")
    assert shape.classes == 16 and shape.top1 <= shape_own.top1
    assert torch.equal(captured[-2][1], captured[-1][1])  # ToyShape is the first block: offset 0
    # no task seen, or only the dataset itself: the dataset's own head, the same numbers exactly
    assert evaluator.evaluate("ToySize", seen=[]) == own
    assert evaluator.evaluate("ToyShape", seen=["ToyShape"]) == shape_own
    built = evaluator.heads_built
    evaluator.evaluate("ToySize", seen=seen)
    assert evaluator.heads_built == built  # every seen dataset's head is built once per model state


def test_a_method_may_supply_its_own_task_agnostic_head(micro):
    evaluator = ZeroShotEvaluator(micro.model, workers=0, batch_size=16, max_size=16, seed=0)
    asked = []

    def own_head(name, layout):
        asked.append((name, tuple(layout)))
        total = sum(len(evaluator.task(d).classnames) for d in layout)
        return ZeroShotHead(torch.zeros(micro.model.text_projection.shape[1], total))

    evaluator.task_agnostic_head = own_head
    result = evaluator.evaluate("ToySize", seen=["ToyShape"])
    assert asked == [("ToySize", ("ToyShape", "ToySize"))] and result.classes == 11
    evaluator.evaluate("ToySize", seen=[])  # one dataset: its own head, the method is not asked
    assert len(asked) == 1


# ------------------------------------------------------------------------------------------ a sequence, both ways


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two-task image-fc sequence (learned linear heads) in both label spaces."""
    folders = {}
    for space in ("dataset", "seen"):
        folder = tmp_path_factory.mktemp(space)
        assert main([*FAST, "--train-dataset", ",".join(TASKS), "--train-mode", "image-fc", "--eval-datasets",
                     ",".join(TASKS + [EXTRA]), "--label-space", space, "--save", str(folder)]) == 0
        folders[space] = folder
    return folders


def test_seen_equals_dataset_where_nothing_else_was_seen(runs):
    dataset, seen = _cells(runs["dataset"]), _cells(runs["seen"])
    for name in TASKS + [EXTRA]:  # the zero-shot row: no task seen
        assert (seen[0, name]["top1"], seen[0, name]["top5"]) == (dataset[0, name]["top1"], dataset[0, name]["top5"])
        assert seen[0, name]["classes"] == CLASSES[name]
    first = TASKS[0]  # its own column after it alone
    assert (seen[1, first]["top1"], seen[1, first]["top5"]) == (dataset[1, first]["top1"], dataset[1, first]["top5"])
    assert seen[1, first]["classes"] == CLASSES[first]


def test_seen_is_at_most_dataset_after_two_tasks(runs):
    dataset, seen = _cells(runs["dataset"]), _cells(runs["seen"])
    for name in TASKS:
        assert seen[2, name]["classes"] == CLASSES["ToyShape"] + CLASSES["ToyColor"]  # ranked among both tasks'
        assert seen[2, name]["top1"] <= dataset[2, name]["top1"]
        assert seen[2, name]["top5"] <= dataset[2, name]["top5"]
    assert seen[2, EXTRA]["classes"] == sum(CLASSES.values())
    # the matrix and its metrics are of the seen cells
    long = mx.read_matrix(runs["seen"] / "accuracy_matrix.csv")
    assert float(long[(long.after_task == 2) & (long.dataset == "ToyColor")].top1.iloc[0]) == seen[2, "ToyColor"]["top1"]
    summary = mx.read_summary(runs["seen"] / "summary.csv")
    assert [row["method"] for row in summary] == ["finetune [label space: seen]"]
    assert summary[0]["last"] == pytest.approx((seen[2, "ToyShape"]["top1"] + seen[2, "ToyColor"]["top1"]) / 2, abs=1e-3)
    assert [row["method"] for row in mx.read_summary(runs["dataset"] / "summary.csv")] == ["finetune"]


def test_results_record_the_label_space_and_old_files_read_as_dataset(runs, tmp_path, capsys):
    for space in ("dataset", "seen"):
        records = _records(runs[space])
        assert records and {r["label_space"] for r in records} == {space}
        assert records_label_space(records) == space
    # a results.jsonl written before the field: dataset
    old = [{key: value for key, value in r.items() if key != "label_space"} for r in _records(runs["dataset"])]
    assert label_space_of(old[0]) == "dataset" and records_label_space(old) == "dataset"
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert main(["--summarize", str(tmp_path)]) == 0
    assert [row["method"] for row in mx.read_summary(tmp_path / "summary.csv")] == ["finetune"]
    # --summarize of a seen run says so; a file mixing both is one line
    seen_folder = tmp_path / "seen"
    seen_folder.mkdir()
    (seen_folder / "results.jsonl").write_text((runs["seen"] / "results.jsonl").read_text())
    assert main(["--summarize", str(seen_folder)]) == 0
    assert "finetune [label space: seen]" in capsys.readouterr().out
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "results.jsonl").write_text((runs["seen"] / "results.jsonl").read_text()
                                         + "".join(json.dumps(r) + "\n" for r in old))
    _one_line_error(capsys, ["--summarize", str(mixed)], "mixes", "dataset and seen")
    with pytest.raises(UserError):
        records_label_space(old + _records(runs["seen"]))
    assert summary_label("finetune", None) == "finetune" == summary_label("finetune", "dataset")


def test_a_chain_link_in_another_label_space_is_refused(runs, tmp_path, capsys):
    folder = tmp_path / "chain"
    shutil.copytree(runs["seen"], folder)
    before = (folder / "results.jsonl").read_text()
    error = _one_line_error(capsys, [*FAST, "--load", str(folder / "ToyColor.pth"), "--train-dataset", "ToyCount",
                                     "--train-mode", "image-fc", "--label-space", "dataset", "--save", str(folder)],
                            "--label-space seen", "--label-space dataset")
    assert "another --save" in error and (folder / "results.jsonl").read_text() == before


def test_eval_only_seen_uses_the_checkpoints_tasks(runs, tmp_path, capsys):
    folder = runs["seen"]
    argv = ["--model", "toyclip", "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0",
            "--device", "cpu", "--eval-only", "--load", str(folder / "ToyColor.pth"), "--eval-datasets",
            ",".join(TASKS + [EXTRA]), "--label-space", "seen", "--save", str(tmp_path)]
    assert main(argv) == 0
    capsys.readouterr()
    trained = _cells(folder)
    records = {r["dataset"]: r for r in _records(tmp_path)}
    for name in TASKS + [EXTRA]:  # the training run's last row, measured again
        assert (records[name]["top1"], records[name]["classes"]) == (trained[2, name]["top1"],
                                                                     trained[2, name]["classes"])
        assert records[name]["label_space"] == "seen" and records[name]["variant"] == "seen"
        assert (tmp_path / f"metrics_{name}_seen.csv").is_file()  # never over the checkpoint's own rows
    # without --label-space seen: dataset, as before
    assert main([*argv[:-4], "--save", str(tmp_path / "dataset")]) == 0
    assert {r["label_space"] for r in _records(tmp_path / "dataset")} == {"dataset"}
    # a model that records no trained task: one line, nothing written
    _one_line_error(capsys, [*argv[:10], "--eval-only", "--eval-datasets", EXTRA, "--label-space", "seen", "--save",
                             str(tmp_path / "none")], "--label-space seen", "records none")
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("method", ["tip-adapter", "tip-adapter-f", "tip-x"])
def test_tip_adapter_with_seen_is_refused_before_anything_is_written(method, tmp_path, capsys):
    save = tmp_path / "run"
    _one_line_error(capsys, [*FAST[:2], "--method", method, "--train-dataset", "ToyShape", "--shots", "2",
                             "--label-space", "seen", "--save", str(save)],
                    "--label-space seen", f"--method {method}", "cache")
    assert not save.exists()


def test_embedding_adapter_with_seen_is_refused(tmp_path, capsys):
    _one_line_error(capsys, [*FAST, "--method", "embedding-adapter", "--train-dataset", "ToyShape", "--label-space",
                             "seen", "--save", str(tmp_path / "run")], "--label-space seen", "own adapter")
    assert not (tmp_path / "run").exists()


def test_bad_label_space_names_the_accepted_values(capsys):
    line = _one_line_error(capsys, ["--label-space", "all", "--train-dataset", "ToyShape", "--iterations", "1"],
                           "--label-space")
    assert "dataset" in line and "seen" in line


@pytest.mark.parametrize("extra, words", [
    (["--report"], ("--report", "--label-space seen")),
    (["--base-new", "--shots", "2"], ("--base-new", "--label-space seen")),
])
def test_flags_that_rank_among_a_datasets_own_classes_are_refused_with_seen(extra, words, tmp_path, capsys):
    _one_line_error(capsys, [*FAST, "--train-dataset", "ToyShape", "--label-space", "seen", "--save",
                             str(tmp_path / "run"), *extra], *words)
    assert not (tmp_path / "run").exists()


def test_eval_single_has_no_label_space(tmp_path, capsys):
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n")
    _one_line_error(capsys, ["--model", "micro-vit", "--eval-single", str(tmp_path / "x.png"), "--class-names",
                             str(names), "--label-space", "seen"], "--label-space")
