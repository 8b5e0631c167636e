"""The default warm-up never keeps a short task from reaching its --lr (issue 25: 100 warm-up steps over a 20-step
task peaked at a tenth of --lr, silently): left at its default, it is cut to a tenth of the task with a note; a
warm-up the user states is kept as stated; a task resumed mid-way keeps the warm-up it began with."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtil.engine.schedule import fair_warmup
from mtil.main import main
from mtil.tensor_files import save_tensors
from tests.helpers import load, run_killed_at

RUN = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "20", "--batch-size", "8",
       "--lr", "1e-3", "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu", "--log-every", "1"]


def _lrs(save: Path) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+/20 .* lr (\S+)", (save / "train.log").read_text())]


@pytest.mark.parametrize(("warmup", "total", "expected"), [(100, 20, 2), (100, 1000, 100), (100, 5, 1),
                                                           (10, 1000, 10), (100, 0, 100)])
def test_fair_warmup_is_a_tenth_of_the_task_at_most(warmup, total, expected):
    assert fair_warmup(warmup, total) == expected


def test_the_default_warmup_is_cut_to_a_tenth_of_a_short_task(tmp_path, capsys):
    save = tmp_path / "run"
    assert main([*RUN, "--save", str(save)]) == 0
    assert "the default warm-up of 100 steps is longer than a tenth of the task's 20 steps; 2 instead" in \
        capsys.readouterr().out
    lrs = _lrs(save)
    assert len(lrs) == 20 and lrs[1] == pytest.approx(1e-3, rel=1e-2)  # the peak at step 2: --lr itself
    assert load(save / "latest.pth")["state"]["warmup"] == 2


def test_a_stated_warmup_is_kept(tmp_path, capsys):
    save = tmp_path / "run"
    assert main([*RUN, "--warmup-length", "100", "--save", str(save)]) == 0
    assert "default warm-up" not in capsys.readouterr().out
    assert max(_lrs(save)) == pytest.approx(2.1e-4, rel=1e-2)  # 21 of a 100-step warm-up after step 20: as stated


def test_a_task_resumed_mid_way_keeps_its_warmup(tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    argv = [*RUN, "--checkpoint-interval", "5"]
    assert main([*argv, "--save", str(straight)]) == 0
    run_killed_at(monkeypatch, [*argv, "--save", str(killed)], [], 7)
    assert main([*argv, "--save", str(killed)]) == 0
    assert (killed / "accuracy_matrix.csv").read_text() == (straight / "accuracy_matrix.csv").read_text()
    assert _lrs(killed)[-13:] == _lrs(straight)[-13:]  # steps 8-20 of the resumed run: the same schedule


def test_a_task_begun_by_an_older_mtil_resumes_with_the_warmup_it_began_with(tmp_path, monkeypatch):
    """A checkpoint written before this rule has no ``warmup`` in its state: its task began with the flag's 100
    steps, and goes on with them (recomputing the rule mid-task would change the schedule under it)."""
    save = tmp_path / "run"
    argv = [*RUN, "--checkpoint-interval", "5", "--save", str(save)]
    run_killed_at(monkeypatch, argv, [], 7)
    payload = load(save / "latest.pth")
    assert payload["state"].pop("warmup") == 2 and payload["state"]["step"] == 5
    save_tensors(payload, save / "latest.pth")  # as an older mtil wrote it
    assert main(argv) == 0
    assert _lrs(save)[-15:] == pytest.approx([(s + 1) / 100 * 1e-3 for s in range(6, 21)], rel=1e-2)
