"""The records seam: one results.jsonl schema for every writer, metric files that survive damage (rebuilt
identical from the journal, or one line naming the journal when it is the damaged one), --summarize that never
replaces a file with a less complete one, and the owner's memory of its latest step that a resumed run replays
to the trackers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtil.main import main
from mtil.records import Records
from mtil.records.files import RESULT_SCHEMA
from mtil.records.sink import Sink
from tests.helpers import run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
BASE = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "4", "--checkpoint-interval", "2"]
EVAL = ["--model", "micro-vit", "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
FILES = ("metrics_ToyShape.csv", "metrics_ToyColor.csv", "accuracy_matrix.csv", "results.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("whole") / "run"
    assert main([*BASE, "--save", str(save)]) == 0
    return save


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def _copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_training_and_eval_only_write_one_results_schema(finished, tmp_path):
    save = _copy(finished, tmp_path / "run")
    assert main([*EVAL, "--eval-only", "--load", str(save / "latest.pth"), "--eval-datasets", "ToyShape",
                 "--save", str(save)]) == 0
    assert main([*EVAL, "--eval-only", "--load", str(save / "latest.pth"), "--eval-datasets", "ToyShape",
                 "--wise-ft", "--save", str(save)]) == 0
    records = _records(save)
    keys = {frozenset(r) for r in records}
    assert len(keys) == 1, keys  # every writer, one shape
    assert {type(r["classes"]) for r in records} == {int} and {r["part"] for r in records} == {"all"}
    assert all(r["schema"] == RESULT_SCHEMA for r in records)
    trained = next(r for r in records if r["after_task"] == 2 and r["dataset"] == "ToyShape")
    eval_only, blend = records[-2], records[-1]
    assert eval_only["after_task"] is None and eval_only["method"] == "finetune" and eval_only["variant"] == ""
    assert eval_only["iteration"] == trained["iteration"] == 8 and eval_only["top1"] == trained["top1"]
    assert blend["variant"] == "wiseft0.5" and (save / "metrics_ToyShape_wiseft0.5.csv").is_file()
    # the folder is still consistent: a re-run of the finished training run finds nothing to repair
    assert main([*BASE, "--save", str(save)]) == 0


def test_short_metric_files_are_rebuilt_identical_on_resume(finished, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*BASE, "--save", str(save)], ["ToyShape"], 3)
    matrix = save / "accuracy_matrix.csv"
    matrix.write_bytes(matrix.read_bytes()[: len(matrix.read_bytes()) // 2])  # cut in half
    (save / "metrics_ToyShape.csv").write_bytes(b"")  # emptied
    short = save / "metrics_ToyColor.csv"
    short.write_text("\n".join(short.read_text().splitlines()[:2]) + "\n")  # header and one of its two rows
    capsys.readouterr()
    assert main([*BASE, "--save", str(save)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "rebuilt from results.jsonl" in line]
    assert len(warnings) == 3, warnings  # each file named
    for name in FILES[:3]:
        assert (save / name).read_text() == (finished / name).read_text(), name
    assert [{k: v for k, v in r.items() if k not in ("time", "config")} for r in _records(save)] == \
        [{k: v for k, v in r.items() if k not in ("time", "config")} for r in _records(finished)]


@pytest.mark.parametrize("damage", ["garbled-line", "lost-line"])
def test_a_damaged_results_journal_stops_the_resume_in_one_line(damage, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*BASE, "--save", str(save)], ["ToyShape"], 3)
    lines = (save / "results.jsonl").read_bytes().split(b"\n")
    lines[1] = b"\xff\x00 garbled" if damage == "garbled-line" else None
    (save / "results.jsonl").write_bytes(b"\n".join(line for line in lines if line is not None))
    before = {p.name: p.read_bytes() for p in save.iterdir()}
    capsys.readouterr()
    assert main([*BASE, "--save", str(save)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.jsonl" in err[0], err
    assert "lacks 1 evaluation(s) (after task 0 ToyColor) that accuracy_matrix.csv holds" in err[0]
    assert ("damaged at line 2" in err[0]) == (damage == "garbled-line")
    assert {p.name: p.read_bytes() for p in save.iterdir()} == before  # nothing written


def test_summarize_never_replaces_a_matrix_with_a_less_complete_one(finished, tmp_path, capsys):
    folder = _copy(finished, tmp_path / "run")
    lines = (folder / "results.jsonl").read_text().splitlines(keepends=True)
    (folder / "results.jsonl").write_text("".join(lines[:3] + lines[4:]))  # one after-task record lost
    matrix = (folder / "accuracy_matrix.csv").read_bytes()
    assert main(["--summarize", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks" in err[0] and "accuracy_matrix.csv" in err[0]
    assert (folder / "accuracy_matrix.csv").read_bytes() == matrix


def test_summarize_rebuilds_damaged_metric_files_identical(finished, tmp_path, capsys):
    folder = _copy(finished, tmp_path / "run")
    (folder / "accuracy_matrix.csv").write_bytes(b"\xff\xfe garbage")
    (folder / "metrics_ToyColor.csv").write_bytes(b"")
    (folder / "summary.csv").unlink()
    assert main(["--summarize", str(folder)]) == 0
    assert "metrics_ToyColor.csv is short or differs from results.jsonl; rebuilt" in capsys.readouterr().err
    for name in ("accuracy_matrix.csv", "summary.csv", "metrics_ToyColor.csv"):
        assert (folder / name).read_text() == (finished / name).read_text(), name


class Recording(Sink):
    name = "recording"

    def __init__(self, folder, run_name):
        super().__init__(folder, run_name)
        self.calls = []

    def start(self, config, resumed_at, replay):
        self.calls.append(("start", resumed_at, replay))

    def scalars(self, step, values):
        self.calls.append(("scalars", step, dict(values)))


def test_the_owner_replays_its_latest_step_to_a_resumed_tracker(tmp_path):
    first = Records(tmp_path, {}, "finetune", [Recording(tmp_path, "r")])
    first.start()
    first.scalars(5, {"train/ce": 1.5, "train/lr": 0.1})
    first.evaluation({"dataset": "A", "iteration": 5, "top1": 50.0, "top5": 90.0, "variant": ""}, task=1)
    state = first.state_dict()
    first.scalars(7, {"train/ce": 1.0})  # after the checkpoint: the resumed run drops and redoes it
    resumed = Records(tmp_path, {}, "finetune", [Recording(tmp_path, "r")])
    resumed.load_state_dict(json.loads(json.dumps(state)))  # plain values, as a weights-only checkpoint holds
    resumed.start(resumed_at=5)
    (call,) = resumed.trackers[0].calls
    assert call == ("start", 5, [(5, {"train/ce": 1.5, "train/lr": 0.1, "eval/A/top1": 50.0, "eval/A/top5": 90.0,
                                      "eval/task": 1.0})])
    elsewhere = Records(tmp_path, {}, "finetune", [Recording(tmp_path, "r")])
    elsewhere.load_state_dict(state)
    elsewhere.start(resumed_at=9)  # a fallback checkpoint of another step: nothing of step 5 to replay
    assert elsewhere.trackers[0].calls == [("start", 9, [])]
