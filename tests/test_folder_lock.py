"""One run per folder: a second process on a --save folder in use is refused in one line naming the holder and
touches nothing there (not even the live process's temporary files); a lock left by a killed process is taken
over; every exit releases it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtil.folder_lock import LOCK_NAME, FolderLock, holder
from mtil.main import main

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
RUN = [*FAST, "--train-dataset", "ToyShape", "--iterations", "2"]
ROOT = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pathlib import Path
from mtil.folder_lock import FolderLock
lock = FolderLock(Path(sys.argv[1])).acquire()
(Path(sys.argv[1]) / ".latest.pth.abc123.tmp").write_bytes(b"half a checkpoint")  # a write in progress
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held(tmp_path):
    """A live process holding ``tmp_path/run`` with a temporary file of its own in it."""
    folder = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == b"held"
    yield folder, process
    process.kill()
    process.wait()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


EVAL = ["--model", "micro-vit", "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("command", [RUN, [*EVAL, "--eval-only", "--eval-datasets", "ToyShape"],
                                     ["--summarize"]])
def test_a_second_process_is_refused_in_one_line_and_touches_nothing(held, command, capsys):
    folder, process = held
    (folder / "results.jsonl").write_text("")
    before = _snapshot(folder)
    argv = [*command, str(folder)] if command == ["--summarize"] else [*command, "--save", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by process" in err[0] and str(process.pid) in err[0], err
    assert _snapshot(folder) == before  # the holder's temporary file included


def test_a_lock_left_by_a_killed_process_is_taken_over(held, capsys):
    folder, process = held
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (folder / LOCK_NAME).is_file() and holder(folder) is None  # the file stays; nobody holds it
    assert main([*RUN, "--save", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "removed 1 temporary file(s)" in out  # the dead process's leftover, now that no one writes it
    assert not (folder / LOCK_NAME).exists()


def test_every_exit_releases_the_lock(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    assert main([*RUN, "--save", str(folder)]) == 0
    assert not (folder / LOCK_NAME).exists()
    def fail(run, task, components):
        raise RuntimeError("a crash inside the run")

    monkeypatch.setattr("mtil.engine.sequence.run_before_task", fail)
    with pytest.raises(RuntimeError):
        main([*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "2", "--save",
              str(tmp_path / "other")])
    assert not (tmp_path / "other" / LOCK_NAME).exists() and holder(tmp_path / "other") is None


def test_the_lock_names_its_holder_and_one_process_may_not_take_it_twice(tmp_path):
    folder = tmp_path / "run"
    with FolderLock(folder):
        info = holder(folder)
        assert info["pid"] == os.getpid() and abs(info["since"] - time.time()) < 60
        with pytest.raises(Exception, match="in use by process"):
            FolderLock(folder).acquire()
    assert holder(folder) is None and not (folder / LOCK_NAME).exists()
