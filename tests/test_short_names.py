"""An image folder or CSV set is called by its own name in tables, plots, progress lines and file names (issue
25: its full path was every column and file name); results.jsonl and accuracy_matrix.csv keep the full name (the
data that was read); two datasets of one short name are refused."""
from __future__ import annotations

import json

import pytest

from mtil.evaluation.matrix import format_matrix, matrix_from_results
from mtil.evaluation.metrics_io import safe_name, short_name, short_name_clashes
from mtil.main import main
from tests.fixtures import dataset_formats as fx


@pytest.mark.parametrize(("name", "short"), [
    ("ImageFolder:/data/sets/har_dataset", "har_dataset"), ("ImageFolder:/data/sets/har_dataset/", "har_dataset"),
    ("ImageFolder:relative/pets", "pets"), ("CSV:/lists/open_images.csv", "open_images"), ("DTD", "DTD"),
    ("ImageNetSubset:100", "ImageNetSubset:100"),
])
def test_short_names(name, short):
    assert short_name(name) == short


def test_clashes_are_pairs_of_different_datasets():
    assert short_name_clashes(["ImageFolder:/a/x", "ImageFolder:/b/x", "DTD"]) == [
        ("ImageFolder:/a/x", "ImageFolder:/b/x")]
    assert short_name_clashes(["ImageFolder:/a/dtd", "DTD"]) == [("ImageFolder:/a/dtd", "DTD")]  # one file name
    assert short_name_clashes(["ImageFolder:/a/x", "ImageFolder:/a/x", "ToyShape"]) == []
    assert safe_name("ImageFolder:/a/x y") == "x_y"


def test_a_folder_run_names_its_files_and_columns_by_the_folder(tmp_path, capsys):
    root = tmp_path / "deep" / "path" / "to" / "har_set"
    fx.make_image_folder(root, 3, 4)
    save = tmp_path / "run"
    assert main(["--model", "micro-vit", "--device", "cpu", "--workers", "0", "--train-dataset",
                 f"ImageFolder:{root}", "--iterations", "2", "--batch-size", "4", "--max-evaluation-size", "8",
                 "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "after 1: har_set" in out and "[after task 1] har_set" in out and "[har_set] step 2/2" in out
    assert "note: har_set: the default warm-up" in out
    assert (save / "metrics_har_set.csv").is_file() and (save / "har_set.pth").is_file()
    records = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in records} == {f"ImageFolder:{root}"}  # the data read, in full
    long, order = matrix_from_results(save / "results.jsonl")
    assert "har_set" in format_matrix(long, order).splitlines()[0]


def test_two_folders_of_one_name_are_refused(tmp_path, capsys):
    for parent in ("a", "b"):
        fx.make_image_folder(tmp_path / parent / "pets", 2, 2)
    assert main(["--model", "micro-vit", "--device", "cpu", "--workers", "0", "--train-dataset",
                 f"ImageFolder:{tmp_path / 'a' / 'pets'},ImageFolder:{tmp_path / 'b' / 'pets'}", "--iterations", "1",
                 "--save", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "would both be called 'pets'" in err and not (tmp_path / "run").exists()


def test_a_run_begun_with_whole_path_file_names_still_reads(tmp_path, capsys):
    """A folder written before short names holds metrics_ImageFolder_<path>.csv and ImageFolder_<path>.pth: they
    are an older mtil's files, not foreign ones (--summarize rebuilds the short-named metrics file from
    results.jsonl), and a re-run of the finished run still verifies the whole-path task checkpoint."""
    from mtil.evaluation.metrics_io import legacy_safe_name
    from tests.damage import overwrite_in_place

    root = tmp_path / "sets" / "pets"
    fx.make_image_folder(root, 2, 4)
    save = tmp_path / "run"
    argv = ["--model", "micro-vit", "--device", "cpu", "--workers", "0", "--train-dataset", f"ImageFolder:{root}",
            "--iterations", "2", "--batch-size", "4", "--max-evaluation-size", "8", "--save", str(save)]
    assert main(argv) == 0
    old = legacy_safe_name(f"ImageFolder:{root}")
    (save / "metrics_pets.csv").rename(save / f"metrics_{old}.csv")
    (save / "pets.pth").rename(save / f"{old}.pth")
    assert main(["--summarize", str(save)]) == 0 and (save / "metrics_pets.csv").is_file()
    overwrite_in_place(save / f"{old}.pth", nbytes=64)
    capsys.readouterr()
    assert main(argv) == 2
    assert f"{old}.pth is damaged" in capsys.readouterr().err
