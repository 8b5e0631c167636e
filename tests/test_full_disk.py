"""A full disk is one line and loses nothing: every file written before stays byte-identical, no temporary file
is left behind, and the same command run again (space freed) resumes and ends as the uninterrupted run."""
from __future__ import annotations

import errno
import logging
import pathlib
from pathlib import Path

import pytest
import torch

import mtil.atomic
from mtil.atomic import atomic_open
from mtil.errors import NoSpaceError, no_space_cause
from mtil.evaluation.metrics_io import append_result_line
from mtil.main import main
from mtil.methods.finetune import Finetune

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
BASE = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "4", "--checkpoint-interval", "2"]


class FullDisk:
    """Once ``fill()`` is called, every write through mtil's writers fails with ENOSPC, as on a full device: the
    atomic writer's temporary files and files opened by path for writing or appending (results.jsonl)."""

    def __init__(self, monkeypatch):
        self.full = False
        disk = self
        real_fdopen, real_open = mtil.atomic.os.fdopen, pathlib.Path.open

        class Writer:
            """The real file, whose writes fail once the disk is full."""

            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                if disk.full:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.handle.write(data)

            def __getattr__(self, name):
                return getattr(self.handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

        def fdopen(fd, mode="r", *args, **kwargs):
            return Writer(real_fdopen(fd, mode, *args, **kwargs))

        def path_open(self, mode="r", *args, **kwargs):
            handle = real_open(self, mode, *args, **kwargs)
            return Writer(handle) if any(c in mode for c in "wa+") else handle

        self.writer = Writer
        monkeypatch.setattr(mtil.atomic.os, "fdopen", fdopen)
        monkeypatch.setattr(pathlib.Path, "open", path_open)

    def fill(self):
        self.full = True
        for handler in logging.getLogger("mtil.train").handlers:  # train.log, opened before the disk filled
            handler.stream = self.writer(handler.stream)


def _files(folder: Path) -> dict[str, bytes]:
    """The folder's files, but the run's lock (held while it runs, removed when it ends)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".mtil.lock"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> str:
    save = tmp_path_factory.mktemp("whole") / "run"
    assert main([*BASE, "--save", str(save)]) == 0
    return (save / "accuracy_matrix.csv").read_text()


@pytest.mark.parametrize("step", [1, 3], ids=["before-a-periodic-checkpoint", "before-the-task-checkpoint"])
def test_a_full_disk_is_one_line_loses_nothing_and_resumes_exactly(step, tmp_path, monkeypatch, capsys,
                                                                     uninterrupted):
    save = tmp_path / "run"
    before: dict[str, bytes] = {}
    with monkeypatch.context() as patch:
        disk = FullDisk(patch)
        original = Finetune.after_step

        def after_step_then_fill(self, run):
            original(self, run)
            if run.state.completed == ["ToyShape"] and run.state.step == step and not disk.full:
                before.update(_files(save))
                disk.fill()

        patch.setattr(Finetune, "after_step", after_step_then_fill)
        assert main([*BASE, "--save", str(save)]) == 2
    assert disk.full and before, "the disk never filled: the test did not reach its point"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device" in err[0] and str(save) in err[0]
    after = _files(save)
    assert not [name for name in after if name.endswith(".tmp")]
    assert after == before, "a file written before the disk filled changed or vanished"
    assert main([*BASE, "--save", str(save)]) == 0
    assert (save / "accuracy_matrix.csv").read_text() == uninterrupted


def test_the_atomic_writer_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "latest.pth"
    torch.save({"a": torch.ones(3)}, target)
    old = target.read_bytes()
    disk = FullDisk(monkeypatch)
    disk.fill()
    with pytest.raises(NoSpaceError, match="latest.pth"):
        with atomic_open(target, "wb") as handle:
            torch.save({"a": torch.zeros(100_000)}, handle)  # torch reports it as a RuntimeError: followed
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


def test_a_full_disk_while_appending_a_result_names_results_jsonl(tmp_path, monkeypatch):
    disk = FullDisk(monkeypatch)
    append_result_line(tmp_path, {"after_task": 0}, {})
    disk.fill()
    with pytest.raises(NoSpaceError, match="results.jsonl"):
        append_result_line(tmp_path, {"after_task": 1}, {})


def test_the_cause_is_found_behind_torchs_runtime_error():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
    except RuntimeError as exc:
        assert no_space_cause(exc).errno == errno.ENOSPC
    assert no_space_cause(RuntimeError("other")) is None
    assert no_space_cause(OSError(errno.EACCES, "denied")) is None


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """mkstemp's 0600 must not leak: a new file gets 0666 less the umask, a replaced file keeps its mode."""
    import stat

    from mtil.atomic import DEFAULT_MODE, atomic_open

    fresh = tmp_path / "fresh.txt"
    with atomic_open(fresh) as handle:
        handle.write("x")
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    assert stat.S_IMODE(fresh.stat().st_mode) == DEFAULT_MODE == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    fresh.chmod(0o640)
    with atomic_open(fresh) as handle:
        handle.write("y")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_text() == "y"
