"""The original tool's loop, one process per task each loading the previous task's checkpoint, ends with the same
matrix, summary and Transfer as the sequence run in one process (issue 25: its earlier links never saw the later
tasks, so the matrix lacked them and Transfer was empty, even after --summarize)."""
from __future__ import annotations

from pathlib import Path

from mtil.main import main

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu", "--log-every", "0", "--iterations", "3"]
TASKS = ["ToyShape", "ToyColor", "ToyCount"]


def _chain(save: Path, *extra: str) -> None:
    previous: list[str] = []
    for task in TASKS:
        assert main([*FAST, *extra, "--train-dataset", task, *previous, "--save", str(save)]) == 0
        previous = ["--load", str(save / f"{task}.pth")]


def test_a_chain_of_one_task_processes_gives_the_sequences_matrix(tmp_path, capsys):
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    assert main([*FAST, "--train-dataset", ",".join(TASKS), "--save", str(straight)]) == 0
    _chain(chain)
    assert "filled for the chain" in capsys.readouterr().out
    assert (chain / "accuracy_matrix.csv").read_text() == (straight / "accuracy_matrix.csv").read_text()
    assert (chain / "summary.csv").read_text() == (straight / "summary.csv").read_text()
    transfer = (chain / "summary.csv").read_text().splitlines()[1].split(",")[1]
    assert transfer != ""  # Transfer is there
    assert main(["--summarize", str(chain)]) == 0  # and --summarize keeps it
    assert (chain / "summary.csv").read_text() == (straight / "summary.csv").read_text()


def test_rows_whose_weights_are_gone_are_named(tmp_path, capsys):
    _chain(tmp_path / "chain", "--keep-checkpoints", "last")
    out = capsys.readouterr().out
    assert "row 1 of the matrix lacks ToyCount and its weights (ToyShape.pth) are not kept" in out


def test_a_link_resumed_after_a_kill_fills_what_it_had_not(tmp_path, monkeypatch):
    """A link killed before its filling finished (here: its filled cells removed from the journal and the matrix,
    as if the kill came first) fills them when the same command resumes, and the chain still ends with the
    straight sequence's matrix."""
    import json

    from tests.helpers import run_killed_at

    straight, chain = tmp_path / "straight", tmp_path / "chain"
    argv = [*FAST, "--checkpoint-interval", "1"]
    assert main([*argv, "--train-dataset", "ToyShape,ToyColor", "--save", str(straight)]) == 0
    assert main([*argv, "--train-dataset", "ToyShape", "--save", str(chain)]) == 0
    link = [*argv, "--train-dataset", "ToyColor", "--load", str(chain / "ToyShape.pth"), "--save", str(chain)]
    run_killed_at(monkeypatch, link, ["ToyShape"], 2)
    results = chain / "results.jsonl"
    kept = [line for line in results.read_text().splitlines()
            if not (json.loads(line)["dataset"] == "ToyColor" and json.loads(line)["after_task"] in (0, 1))]
    results.write_text("".join(line + "\n" for line in kept))
    (chain / "metrics_ToyColor.csv").unlink()  # it held the filled cells only
    matrix = chain / "accuracy_matrix.csv"
    matrix.write_text("".join(line + "\n" for line in matrix.read_text().splitlines()
                              if not line.startswith(("0,ToyColor", "1,ToyColor"))))
    assert main(link) == 0
    assert matrix.read_text() == (straight / "accuracy_matrix.csv").read_text()
