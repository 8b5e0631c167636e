"""One damaged file never ends a run: latest.pth keeps its predecessor as latest.prev.pth, a damaged latest falls
back to it (or to the newest task checkpoint), saying so, and resumes exactly; with nothing good left it is a
one-line error, never a silent start from scratch. Temporary files of an interrupted write are removed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtil.engine.checkpoint import load_resumable
from mtil.errors import UserError
from mtil.main import main
from tests.damage import overwrite_in_place
from tests.helpers import load, run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
BASE = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "4", "--checkpoint-interval", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> str:
    save = tmp_path_factory.mktemp("whole") / "run"
    assert main([*BASE, "--save", str(save)]) == 0
    return (save / "accuracy_matrix.csv").read_text()


def _killed_in_second_task(tmp_path: Path, monkeypatch) -> Path:
    """Killed at step 3 of ToyColor: latest.pth is from its step 2, latest.prev.pth from the end of ToyShape."""
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*BASE, "--save", str(save)], ["ToyShape"], 3)
    return save


def test_the_previous_latest_is_kept(tmp_path, monkeypatch):
    save = _killed_in_second_task(tmp_path, monkeypatch)
    latest, previous = load(save / "latest.pth"), load(save / "latest.prev.pth")
    assert latest["state"]["completed"] == ["ToyShape"] and latest["state"]["step"] == 2
    assert previous["state"]["global_step"] < latest["state"]["global_step"]


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "overwritten", "missing-key", "deleted"])
def test_a_damaged_latest_falls_back_to_the_previous_and_resumes_exactly(damage, tmp_path, monkeypatch, capsys,
                                                                         uninterrupted):
    save = _killed_in_second_task(tmp_path, monkeypatch)
    latest = save / "latest.pth"
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:1000])
    elif damage == "zero-byte":
        latest.write_bytes(b"")
    elif damage == "overwritten":  # 16 floats changed in place: torch.load reads it without complaint
        overwrite_in_place(latest, nbytes=64)
    elif damage == "missing-key":
        payload = load(latest)
        del payload["state"]
        torch.save(payload, latest)
    else:
        latest.unlink()
    assert main([*BASE, "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "resuming from the last good checkpoint" in out and "latest.prev.pth" in out
    assert (save / "accuracy_matrix.csv").read_text() == uninterrupted


def test_with_latest_and_previous_damaged_the_task_checkpoint_is_used(tmp_path, monkeypatch, capsys, uninterrupted):
    save = _killed_in_second_task(tmp_path, monkeypatch)
    for name in ("latest.pth", "latest.prev.pth"):
        (save / name).write_bytes(b"not a checkpoint")
    assert main([*BASE, "--save", str(save)]) == 0
    assert "ToyShape.pth" in capsys.readouterr().out
    assert (save / "accuracy_matrix.csv").read_text() == uninterrupted


def test_with_nothing_good_left_it_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    save = _killed_in_second_task(tmp_path, monkeypatch)
    for path in save.glob("*.pth"):
        path.write_bytes(path.read_bytes()[:500])
    before = {p.name: p.read_bytes() for p in save.iterdir() if p.is_file()}
    assert main([*BASE, "--save", str(save)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no earlier good checkpoint" in err[0] and "Traceback" not in err[0]
    assert {p.name: p.read_bytes() for p in save.iterdir() if p.is_file()} == before


def test_a_checkpoint_missing_an_entry_is_named(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"format": "mtil-checkpoint", "arch": {}, "model": {}, "config": {}, "state": {"sequence": []},
                "optimizer": {}}, path)
    with pytest.raises(UserError, match=r"cannot resume from .*c.pth: it lacks scheduler, rng"):
        load_resumable(path)


def test_temporary_files_of_an_interrupted_write_are_removed(tmp_path, monkeypatch, uninterrupted):
    save = _killed_in_second_task(tmp_path, monkeypatch)
    orphan = save / ".latest.pth.abcd1234.tmp"
    orphan.write_bytes(b"x" * 100)
    assert main([*BASE, "--save", str(save)]) == 0
    assert not orphan.exists()
    assert "removed 1 temporary file" in (save / "train.log").read_text()
    assert (save / "accuracy_matrix.csv").read_text() == uninterrupted
