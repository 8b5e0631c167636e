"""``--report-to tensorboard,wandb`` from the command line (W&B offline): the trackers' series, read back with
TensorBoard's reader and from W&B's offline run, equal the metric CSVs and the progress lines; a run killed like
SIGKILL (in the middle of writing a checkpoint, after it had reported steps past its last good one) and resumed
has each step once, with the values of a run never stopped; a tracker that cannot start is one line before
anything is written."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mtil.main import main
from mtil.records import sink as sink_module
from mtil.records.sink import Sink
from tests.tracker_readback import tensorboard_images, tensorboard_scalars, wandb_history, wandb_summary

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["--model", "micro-vit", "--train-dataset", "ToyShape,ToyColor", "--iterations", "4", "--batch-size", "8",
           "--lr", "1e-3", "--warmup-length", "1", "--max-evaluation-size", "16", "--batch-size-eval", "8",
           "--workers", "0", "--device", "cpu", "--checkpoint-interval", "2", "--threads", "1", "--log-every", "1",
           "--report-to", "tensorboard,wandb"]
TIMING = ("train/images_per_s",)  # wall-clock: differs between any two runs
PROGRESS = re.compile(r"\[(\w+)\] step (\d+)/(\d+)  ce ([0-9.]+)  lr ([0-9.e+-]+)")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_CONSOLE="off", WANDB_X_DISABLE_STATS="true")
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A run never stopped."""
    save = tmp_path_factory.mktemp("straight") / "run"
    done = _run(["-m", "mtil.main", *COMMAND, "--save", str(save)], ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return save


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """Killed half-way through writing the periodic latest.pth of task 2 step 2 (so the run resumes from the one
    written after task 1's evaluation, global step 4, while the killed process had reported steps 5 and 6), then
    resumed."""
    folder = tmp_path_factory.mktemp("resumed")
    save, marker = folder / "run", folder / "marker.json"
    killed = _run(["-m", "tests.kill_driver", "mid-save-latest", str(marker), *COMMAND, "--save", str(save)], ROOT)
    assert killed.returncode == 137 and marker.is_file(), killed.stderr[-2000:]
    assert {step for step, _ in tensorboard_scalars(save)["train/ce"]} >= {5, 6}  # reported past the fallback
    done = _run(["-m", "mtil.main", *COMMAND, "--save", str(save)], ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return save


def _metric_rows(save: Path, dataset: str) -> dict[int, tuple[float, float]]:
    with (save / f"metrics_{dataset}.csv").open(newline="") as handle:
        return {int(r["iteration"]): (float(r["top1"]), float(r["top5"])) for r in csv.DictReader(handle)}


def _progress(save: Path) -> dict[int, tuple[float, float]]:
    """Global step -> (ce, lr) of every progress line in train.log (the tasks are 4 steps each)."""
    out = {}
    for line in (save / "train.log").read_text().splitlines():
        match = PROGRESS.search(line)
        if match:
            task_offset = 0 if match[1] == "ToyShape" else 4
            out[task_offset + int(match[2])] = (float(match[4]), float(match[5]))
    return out


def _wandb_series(save: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in wandb_history(save):
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)):
                series.setdefault(key, []).append((row["_step"], float(value)))
    return series


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_the_trackers_hold_what_the_metric_files_and_progress_lines_say(straight, tracker):
    series = tensorboard_scalars(straight) if tracker == "tensorboard" else _wandb_series(straight)
    for tag, points in series.items():
        assert len({step for step, _ in points}) == len(points), f"{tag} has a step twice: {points}"
    for dataset in ("ToyShape", "ToyColor"):
        rows = _metric_rows(straight, dataset)
        assert sorted(rows) == [0, 4, 8]
        assert dict(series[f"eval/{dataset}/top1"]) == pytest.approx({i: v[0] for i, v in rows.items()}, abs=1e-4)
        assert dict(series[f"eval/{dataset}/top5"]) == pytest.approx({i: v[1] for i, v in rows.items()}, abs=1e-4)
    progress = _progress(straight)
    assert sorted(progress) == list(range(1, 9))
    assert dict(series["train/ce"]) == pytest.approx({s: v[0] for s, v in progress.items()}, abs=6e-5)
    assert dict(series["train/lr"]) == pytest.approx({s: v[1] for s, v in progress.items()}, rel=6e-3)
    assert dict(series["train/task"]) == {s: (1.0 if s <= 4 else 2.0) for s in range(1, 9)}
    assert dict(series["eval/task"]) == {0: 0.0, 4: 1.0, 8: 2.0}
    with (straight / "summary.csv").open(newline="") as handle:
        summary = next(csv.DictReader(handle))
    logged = {k.removeprefix("summary/"): dict(v)[8] for k, v in series.items() if k.startswith("summary/")}
    assert logged["last"] == pytest.approx(float(summary["last"]), abs=1e-4)
    assert logged["avg"] == pytest.approx(float(summary["avg"]), abs=1e-4)
    if tracker == "tensorboard":
        assert [step for step, _, _ in next(iter(tensorboard_images(straight).values()))] == [8]  # the heat map
    else:
        assert wandb_summary(straight)["last"] == pytest.approx(float(summary["last"]), abs=1e-4)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_killed_and_resumed_each_step_appears_once_with_the_straight_runs_values(straight, resumed, tracker):
    read = tensorboard_scalars if tracker == "tensorboard" else _wandb_series
    expected, got = read(straight), read(resumed)
    assert set(got) == set(expected)
    for tag, points in got.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice: {steps}"
        assert steps == [step for step, _ in expected[tag]], tag
        if tag not in TIMING:
            assert [v for _, v in points] == pytest.approx([v for _, v in expected[tag]], abs=1e-6), tag


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard: ImportError, as when not installed
    save = tmp_path / "run"
    assert main([*COMMAND, "--save", str(save)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorboard" in lines[0], lines
    assert not save.exists()


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch, capsys):
    from mtil.records.sinks.tensorboard import TensorBoardSink

    def refuse(self, config, resumed_at, replay):
        raise PermissionError("the event folder is read-only")

    monkeypatch.setattr(TensorBoardSink, "start", refuse)
    save = tmp_path / "run"
    assert main([*COMMAND[:-1], "tensorboard", "--save", str(save)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--report-to tensorboard could not start (PermissionError" in lines[0], lines
    assert not (save / "config.yaml").exists() and not (save / ".mtil.lock").exists()


class Recording(Sink):
    """A tracker added the way any other would be: one class that registers itself."""

    name = "recording"
    calls: list = []

    def start(self, config, resumed_at, replay):
        Recording.calls.append(("start", resumed_at))

    def scalars(self, step, values):
        Recording.calls.append(("scalars", step, sorted(values)))

    def matrix(self, step, table, heatmap):
        Recording.calls.append(("matrix", step, list(table.columns), heatmap.name))

    def summary(self, step, metrics):
        Recording.calls.append(("summary", step, sorted(metrics)))

    def close(self, failed=False):
        Recording.calls.append(("close", failed))


def test_a_new_tracker_is_one_class_that_registers_itself(tmp_path, monkeypatch):
    monkeypatch.setitem(sink_module._SINKS, "recording", Recording)
    monkeypatch.setattr(Recording, "calls", [])
    assert main([*COMMAND[:-1], "recording", "--iterations", "2", "--save", str(tmp_path / "run")]) == 0
    calls = Recording.calls
    assert calls[0] == ("start", None) and calls[-1] == ("close", False)
    assert ("scalars", 0, ["eval/ToyColor/top1", "eval/ToyColor/top5"]) in calls
    assert ("scalars", 3, ["train/ce", "train/images_per_s", "train/lr", "train/task"]) in calls
    assert calls[-3] == ("matrix", 4, ["ToyShape", "ToyColor"], "accuracy_matrix.png")
    assert calls[-2] == ("summary", 4, ["avg", "bwt", "forgetting", "last", "transfer", "zero_shot"])
