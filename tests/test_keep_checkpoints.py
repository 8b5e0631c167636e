"""--keep-checkpoints all|last|none: which per-task checkpoints a sequence leaves, and that the run's results and
its resume do not depend on it."""
from __future__ import annotations

import pytest

from mtil.main import main
from tests.helpers import load

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1", "--device", "cpu",
        "--workers", "0", "--iterations", "2", "--train-dataset", "ToyShape,ToyColor,ToySize",
        "--eval-datasets", "ToyShape", "--log-every", "0"]


@pytest.mark.parametrize("keep, left", [("all", {"ToyShape", "ToyColor", "ToySize"}), ("last", {"ToySize"}),
                                        ("none", set())])
def test_which_task_checkpoints_stay_and_the_matrix_is_the_same(tmp_path, keep, left):
    reference, save = tmp_path / "all", tmp_path / keep
    assert main([*FAST, "--save", str(reference)]) == 0
    assert main([*FAST, "--keep-checkpoints", keep, "--save", str(save)]) == 0
    tasks = {p.stem for p in save.glob("*.pth")} - {"latest", "latest.prev"}
    assert tasks == left
    assert (save / "accuracy_matrix.csv").read_text() == (reference / "accuracy_matrix.csv").read_text()
    final = load(save / "latest.pth")["model"]
    for name, value in load(reference / "ToySize.pth")["model"].items():
        assert value.equal(final[name]), name


def test_a_resume_may_change_it(tmp_path):
    save = tmp_path / "run"
    first = [*FAST[:-6], "--train-dataset", "ToyShape,ToyColor", "--eval-datasets", "ToyShape", "--save", str(save)]
    assert main(first) == 0
    assert {p.stem for p in save.glob("*.pth")} >= {"ToyShape", "ToyColor"}
    # The same finished run re-run with another setting is not refused (an operational flag).
    assert main([*first, "--keep-checkpoints", "last"]) == 0
