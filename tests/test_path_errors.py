"""Paths the file system refuses, and files that are not what a flag expects, end in one line and exit code 2 on
every entry point (issue 24), never a traceback: a name over 255 bytes, a folder under a file, a binary
--class-names file, a summary.csv that is not text."""
from __future__ import annotations

import pytest
from PIL import Image

from mtil.imo import main as imo_main
from mtil.main import main
from mtil.sweep.cli import main as sweep_main

TRAIN = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "1", "--batch-size", "8",
         "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu"]
LONG = "x" * 300


def _one_line(capsys, *fragments: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("where", ["too-long", "under-a-file"])
def test_an_unusable_save_folder_is_one_line(where, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    save = tmp_path / LONG / "run" if where == "too-long" else tmp_path / "a-file" / "run"
    assert main([*TRAIN, "--save", str(save)]) == 2
    _one_line(capsys, "mtil: error:", "over the file system's limit" if where == "too-long" else "is a file")


def test_the_sweep_and_imo_entry_points_say_a_too_long_path_in_one_line(tmp_path, capsys):
    out = tmp_path / LONG
    assert sweep_main(["--base", "python -m mtil.main --model micro-vit --train-dataset ToyShape --iterations 1",
                       "--grid", "lr=1e-3", "--out", str(out)]) == 2
    _one_line(capsys, "mtil.sweep: error:", "over the file system's limit")
    assert imo_main(["--data", "ToyColorA", "--model", "micro-vit", "--device", "cpu", "--epochs", "1",
                     "--save", str(out / "adapter")]) == 2
    _one_line(capsys, "mtil.imo: error:", "over the file system's limit")


def test_a_binary_class_names_file_is_one_line(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_bytes(b"\xff\xfe\x00cat\ndog")
    picture = tmp_path / "cat.png"
    Image.new("RGB", (8, 8), "white").save(picture)
    assert main(["--model", "micro-vit", "--device", "cpu", "--eval-single", str(picture),
                 "--class-names", str(names)]) == 2
    _one_line(capsys, "--class-names", "not UTF-8")


def test_summarize_over_a_summary_that_is_not_text_is_one_line_and_writes_nothing(tmp_path, capsys):
    save = tmp_path / "run"
    assert main([*TRAIN, "--save", str(save)]) == 0
    (save / "summary.csv").write_bytes(b"\xff\xfe\x00 not a table")
    before = {p.name: p.read_bytes() for p in save.iterdir()}
    capsys.readouterr()
    assert main(["--summarize", str(save)]) == 2
    _one_line(capsys, "summary.csv is damaged")
    assert {p.name: p.read_bytes() for p in save.iterdir()} == before
