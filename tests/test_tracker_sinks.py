"""The tracker sinks (``--report-to tensorboard,wandb``) driven directly, without training: what they write reads
back as logged, and a run killed with SIGKILL and resumed from a checkpoint shows each step once.

W&B runs offline here (``WANDB_MODE=offline``): nothing reaches a server; the read-back merges the offline logs as
W&B would after ``wandb sync`` (see :mod:`tests.tracker_readback`). Sessions are shared by module-scoped fixtures
because every W&B start costs about a second.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mtil.errors import UserError
from mtil.records.sink import check_report_to, sink_class, sink_names
from tests import tracker_readback as rb

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

from mtil.records.sinks.tensorboard import TensorBoardSink  # noqa: E402
from mtil.records.sinks.wandb_sink import WandbSink  # noqa: E402

CONFIG = {"method": "finetune", "lr": 1e-5, "train_dataset": ["ToyShape", "ToyColor"], "save": Path("/tmp/x")}
RESUMED_AT = 5


def train(step: int, stale: bool = False) -> dict[str, float]:
    """The training scalars of a step; ``stale``: what a killed process logged after its checkpoint (differs)."""
    loss = 1000.0 + step if stale else 1.0 / step
    return {"train/loss": loss, "train/lr": 1e-5 * step, "train/images_per_s": 100.0 + step, "train/task": 0.0}


def evaluation(step: int) -> dict[str, float]:
    return {"eval/ToyShape/top1": 50.0 + step, "eval/ToyShape/top5": 90.0 + step / 10, "eval/task": 0.0}


def expected_series(steps) -> dict[str, list[tuple[int, float]]]:
    """Per tag, the (step, value) points a correct run shows for ``steps``: training each step, evaluations at 5
    and 10."""
    series: dict[str, list[tuple[int, float]]] = {}
    for step in steps:
        for tag, value in {**train(step), **(evaluation(step) if step in (5, 10) else {})}.items():
            series.setdefault(tag, []).append((step, value))
    return series


@pytest.fixture(scope="module")
def wandb_offline():
    """W&B offline, quiet, no system metrics or console capture, and none of the developer's W&B settings."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME",
                     "WANDB_API_KEY", "WANDB_BASE_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")
        mp.setenv("WANDB_X_DISABLE_STATS", "true")
        yield
    flush_wandb()  # ends this process's wandb-core service: no process outlives the tests


def flush_wandb() -> None:
    """Wait until W&B's logs are complete on disk: ``run.finish()`` returns before wandb-core has written the
    last block of the log; ending the service (a new one starts with the next run) waits for it."""
    import wandb

    wandb.teardown()


def heatmap_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 6), (200, 30, 30)).save(path)
    return path


MATRIX = pd.DataFrame({"ToyShape": [80.0, 70.0], "ToyColor": [10.0, 90.0]},
                      index=pd.Index([0, 1], name="after_task"))
SUMMARY = {"transfer": 10.0, "avg": 62.5, "last": 80.0}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, wandb_offline):
    """One uninterrupted run: steps 1..10, evaluations at 5 and 10, then the matrix and the summary at 10."""
    folder = tmp_path_factory.mktemp("fresh")
    sinks = [TensorBoardSink(folder, "fresh-run"), WandbSink(folder, "fresh-run")]
    for sink in sinks:
        sink.start(CONFIG, None, [])
    for step in range(1, 11):
        for sink in sinks:
            sink.scalars(step, train(step))
            if step in (5, 10):
                sink.scalars(step, evaluation(step))
    heatmap = heatmap_png(folder / "accuracy_matrix.png")
    for sink in sinks:
        sink.matrix(10, MATRIX, heatmap)
        sink.summary(10, SUMMARY)
        sink.close()
        sink.close()  # twice is harmless
    flush_wandb()
    return folder


KILLED_SESSION = r"""
import os, signal, sys
from pathlib import Path
from mtil.records.sinks.tensorboard import TensorBoardSink
from mtil.records.sinks.wandb_sink import WandbSink
from tests.test_tracker_sinks import CONFIG, RESUMED_AT, evaluation, train

folder = Path(sys.argv[1])
sinks = [TensorBoardSink(folder, "killed-run"), WandbSink(folder, "killed-run")]
for sink in sinks:
    sink.start(CONFIG, None, [])
for step in range(1, 8):  # the checkpoint is at RESUMED_AT; what follows it differs from the resumed run's values
    for sink in sinks:
        sink.scalars(step, train(step, stale=step >= RESUMED_AT))
        if step == RESUMED_AT:
            sink.scalars(step, {key: value + 1000 for key, value in evaluation(step).items()})
            sink.flush()  # the checkpoint at RESUMED_AT: the records owner flushes the trackers before writing it
os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush, no atexit: what a kill -9 leaves
"""


def resume(folder: Path, run_name: str) -> None:
    """The resumed process: checkpoint at RESUMED_AT (its step's records replayed), then steps 6..10."""
    replay = [(RESUMED_AT, {**train(RESUMED_AT), **evaluation(RESUMED_AT)})]
    sinks = [TensorBoardSink(folder, run_name), WandbSink(folder, run_name)]
    for sink in sinks:
        sink.start(CONFIG, RESUMED_AT, replay)
    for step in range(RESUMED_AT + 1, 11):
        for sink in sinks:
            sink.scalars(step, train(step))
            if step == 10:
                sink.scalars(step, evaluation(step))
    for sink in sinks:
        sink.close()
    flush_wandb()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, wandb_offline):
    """Steps 1..7 in a process that SIGKILLs itself, then a resume at step 5. Returns the folder and the W&B rows
    the killed process's log held before the resume."""
    folder = tmp_path_factory.mktemp("killed")
    root = Path(__file__).resolve().parents[1]
    # its own wandb-core, as a separate mtil process has: WANDB_SERVICE would make it share this process's one
    env = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}
    done = subprocess.run([sys.executable, "-c", KILLED_SESSION, str(folder)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    held = rb.wandb_history(folder)
    resume(folder, "killed-run")
    return folder, held


@pytest.fixture(scope="module")
def closed_and_resumed(tmp_path_factory, wandb_offline):
    """Steps 1..7 logged and closed normally (everything on disk, W&B's log complete), then a resume at step 5:
    the case where the earlier W&B log holds steps past the checkpoint."""
    folder = tmp_path_factory.mktemp("closed")
    sinks = [TensorBoardSink(folder, "closed-run"), WandbSink(folder, "closed-run")]
    for sink in sinks:
        sink.start(CONFIG, None, [])
    for step in range(1, 8):
        for sink in sinks:
            sink.scalars(step, train(step, stale=step >= RESUMED_AT))
    for sink in sinks:
        sink.close()
    flush_wandb()
    resume(folder, "closed-run")
    return folder


def wandb_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)):
                series.setdefault(key, []).append((row["_step"], float(value)))
    return series


def assert_series(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for tag, points in expected.items():
        got = actual[tag]
        assert [step for step, _ in got] == [step for step, _ in points], tag
        assert all(math.isclose(a, e, rel_tol=1e-6) for (_, a), (_, e) in zip(got, points)), (tag, got)


# ---------------------------------------------------------------------------------------------- registry, check
def test_both_sinks_are_registered():
    assert sink_names() == ["tensorboard", "wandb"]
    assert sink_class("tensorboard") is TensorBoardSink and sink_class("wandb") is WandbSink


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_check_is_one_line_naming_what_to_install(monkeypatch, name, package):
    check_report_to([name])  # installed: fine
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` fail
    with pytest.raises(UserError) as caught:
        check_report_to([name])
    message = str(caught.value)
    assert "\n" not in message and f"--report-to {name}" in message and f"pip install {package}" in message


def test_importing_the_sink_modules_imports_no_tracker(monkeypatch):
    import mtil.records.sink as registry
    import mtil.records.sinks as package

    monkeypatch.setattr(registry, "_SINKS", dict(registry._SINKS))  # the re-imported classes register here
    for tracker in ("tensorboard", "wandb", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, tracker, None)
    for name in ("tensorboard", "wandb_sink"):
        monkeypatch.setattr(package, name, getattr(package, name))  # the package attribute the import rebinds
        monkeypatch.delitem(sys.modules, f"{package.__name__}.{name}")
        module = importlib.import_module(f"{package.__name__}.{name}")  # ImportError on a module-level import
        assert module.__dict__.get("wandb") is None and module.__dict__.get("SummaryWriter") is None


# ---------------------------------------------------------------------------------------------- a fresh run
def test_fresh_run_reads_back_as_logged_in_tensorboard(fresh):
    scalars = rb.tensorboard_scalars(fresh)
    summary = {tag: scalars.pop(tag) for tag in list(scalars) if tag.startswith("summary/")}
    assert_series(scalars, expected_series(range(1, 11)))
    assert summary == {f"summary/{name}": [(10, value)] for name, value in SUMMARY.items()}


def test_fresh_run_reads_back_as_logged_in_wandb(fresh):
    rows = rb.wandb_history(fresh)
    assert [row["_step"] for row in rows] == list(range(1, 11))  # the calls of one step make one row
    series = wandb_series(rows)
    summary = {key: series.pop(key) for key in list(series) if key.startswith("summary/")}
    assert_series(series, expected_series(range(1, 11)))
    assert summary == {f"summary/{name}": [(10, value)] for name, value in SUMMARY.items()}


def test_matrix_and_summary_read_back_in_tensorboard(fresh):
    texts = rb.tensorboard_texts(fresh)
    assert [step for step, _ in texts["matrix/accuracy"]] == [10]
    table = texts["matrix/accuracy"][0][1].splitlines()
    assert table[0] == "| after_task | ToyShape | ToyColor |"
    assert table[2:] == ["| 0 | 80.00 | 10.00 |", "| 1 | 70.00 | 90.00 |"]
    assert rb.tensorboard_images(fresh) == {"matrix/heatmap": [(10, 8, 6)]}
    config_step, config_text = texts["config"][0]
    assert config_step == 0 and '"lr": 1e-05' in config_text


def test_matrix_summary_and_config_read_back_in_wandb(fresh):
    last = rb.wandb_history(fresh)[-1]
    assert last["_step"] == 10
    assert last["matrix/accuracy"]["_type"] == "table-file"
    assert last["matrix/heatmap"]["_type"] == "image-file"
    assert (last["matrix/heatmap"]["width"], last["matrix/heatmap"]["height"]) == (8, 6)
    session = rb.wandb_sessions(fresh)[-1]
    table = json.loads((session.folder / "files" / last["matrix/accuracy"]["path"]).read_text())
    assert table["columns"] == ["after_task", "ToyShape", "ToyColor"]
    assert table["data"] == [[0, 80.0, 10.0], [1, 70.0, 90.0]]
    summary = rb.wandb_summary(fresh)
    assert {name: summary[name] for name in SUMMARY} == SUMMARY
    config = rb.wandb_config(fresh)
    assert config["lr"] == 1e-5 and config["train_dataset"] == ["ToyShape", "ToyColor"]
    assert config["save"] == "/tmp/x"  # not JSON: its string


# ---------------------------------------------------------------------------------------------- kill and resume
def test_killed_run_resumed_shows_each_step_once_in_tensorboard(killed_and_resumed):
    folder, _ = killed_and_resumed
    # the killed process's steps 5..7 are purged; 1..4 are its (flushed) ones, 5 the replay, 6..10 the resumed run
    assert_series(rb.tensorboard_scalars(folder), expected_series(range(1, 11)))


def test_killed_run_resumed_shows_each_step_once_in_wandb(killed_and_resumed):
    folder, held = killed_and_resumed
    # Whatever the killed process's log got to disk stays (W&B cannot drop it offline); wandb-core writes its log
    # in 32 KiB blocks, so here it holds nothing and the resumed run re-logs steps 1..4 from its journal.
    held_steps = [row["_step"] for row in held]
    assert held_steps == sorted(held_steps) and (not held_steps or held_steps[0] == 1)
    rows = rb.wandb_history(folder)
    assert [row["_step"] for row in rows] == list(range(1, 11))
    expected = expected_series(range(1, 11))
    for row in held:  # a step the killed log holds keeps the killed process's values
        for tag, points in expected.items():
            points[:] = [(s, row[tag]) if s == row["_step"] else (s, v) for s, v in points]
    assert_series(wandb_series(rows), expected)
    assert len(rb.wandb_sessions(folder)) == 2  # one run id, one log per session
    assert json.loads((folder / "wandb_run.json").read_text())["id"] == rb.wandb_run_id(folder)


def test_resumed_run_keeps_the_journal_of_the_steps_before_its_checkpoint(killed_and_resumed):
    folder, _ = killed_and_resumed
    steps = [json.loads(line)["step"] for line in (folder / "wandb_steps.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]  # the killed 5..7 replaced by the replay and the new steps


def test_resume_after_a_complete_log_keeps_what_wandb_already_holds(closed_and_resumed):
    folder = closed_and_resumed
    assert_series(rb.tensorboard_scalars(folder), expected_series(range(1, 11)))  # TensorBoard purges 5..7
    rows = rb.wandb_history(folder)
    assert [row["_step"] for row in rows] == list(range(1, 11))
    # offline W&B records no rewind: steps 5..7 keep the values the first session wrote, 8..10 are the resumed run's
    assert [row["train/loss"] for row in rows] == [1.0 / s for s in range(1, 5)] + [1005.0, 1006.0, 1007.0] + [
        1.0 / s for s in range(8, 11)]
    assert "eval/ToyShape/top1" not in rows[4]  # the replayed evaluation of step 5 was not sent either


# ---------------------------------------------------------------------------------------------- failures
def test_close_is_safe_after_a_failed_start(tmp_path, wandb_offline, monkeypatch):
    import wandb

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    board = TensorBoardSink(not_a_folder, "broken")
    with pytest.raises(OSError):
        board.start(CONFIG, None, [])
    board.close()
    board.close()

    def refuse(*args, **kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", refuse)
    tracker = WandbSink(tmp_path / "run", "broken")
    with pytest.raises(RuntimeError, match="no wandb today"):
        tracker.start(CONFIG, None, [])
    assert tracker._journal is None and not (tmp_path / "run" / "wandb_steps.jsonl").exists()  # opened after init
    tracker.close()
    tracker.close()
    tracker.scalars(1, {"train/loss": 1.0})  # after close: nothing, no error
