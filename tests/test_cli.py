"""The command line end to end, in-process through ``mtil.main.main`` (and once as a real subprocess)."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

from PIL import Image

from mtil.main import main
from mtil.models import clip_loading

EVAL = ["--model", "micro-vit", "--eval-only", "--workers", "0", "--device", "cpu"]


def _metric_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_eval_only_writes_metric_files(tmp_path, capsys):
    save = tmp_path / "run"
    argv = [*EVAL, "--eval-datasets", "ToyShape,ToyColor", "--max-evaluation-size", "30", "--save", str(save)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ToyShape" in out and "ToyColor" in out

    for name in ("ToyShape", "ToyColor"):
        rows = _metric_rows(save / f"metrics_{name}.csv")
        assert rows[0] == ["iteration", "top1", "top5"]
        assert len(rows) == 2
        iteration, top1, top5 = rows[1]
        assert int(iteration) == 0
        assert 0.0 <= float(top1) <= float(top5) <= 100.0
        # 30 images: every accuracy is a multiple of 1/30
        assert abs(float(top1) * 30 / 100 - round(float(top1) * 30 / 100)) < 1e-3
    records = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in records] == ["ToyShape", "ToyColor"]
    for record in records:
        assert record["images"] == 30
        assert record["config"]["model"] == "micro-vit"
        assert record["config"]["max_evaluation_size"] == 30
        assert "model_source" in record["config"]
    first_rows = {name: _metric_rows(save / f"metrics_{name}.csv") for name in ("ToyShape", "ToyColor")}

    # The same evaluation again: still one row per iteration (replaced, not duplicated), same numbers.
    assert main(argv) == 0
    capsys.readouterr()
    for name in ("ToyShape", "ToyColor"):
        assert _metric_rows(save / f"metrics_{name}.csv") == first_rows[name]
    lines = (save / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4  # one line per evaluation: the log keeps both runs
    assert all("config" in json.loads(line) for line in lines)


def test_eval_single_prints_ranked_probabilities(tmp_path, capsys):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 24), (220, 20, 30)).save(image)
    classes = ["red square", "blue circle", "green star", "yellow heart"]
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(classes) + "\n\n")
    assert main(["--model", "micro-vit", "--device", "cpu", "--eval-single", str(image),
                 "--class-names", str(names), "--prompt", "a picture of a {}."]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert str(image) in captured.out
    ranked = re.findall(r"^\s*(\d+)\.\s+(.+?)\s+(\d+\.\d+)%\s*$", captured.out, flags=re.MULTILINE)
    assert [int(rank) for rank, _, _ in ranked] == list(range(1, len(classes) + 1))
    shown = [name for _, name, _ in ranked]
    assert sorted(shown) == sorted(classes)  # each class exactly once
    probabilities = [float(p) for _, _, p in ranked]
    assert probabilities == sorted(probabilities, reverse=True)
    assert abs(sum(probabilities) - 100.0) <= 0.01 * len(classes)


def test_eval_single_many_classes_shows_top_10(tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(14)))
    assert main(["--model", "micro-vit", "--device", "cpu", "--eval-single", str(image),
                 "--class-names", str(names)]) == 0
    out = capsys.readouterr().out
    ranked = re.findall(r"^\s*(\d+)\.\s+(.+?)\s+(\d+\.\d+)%\s*$", out, flags=re.MULTILINE)
    assert len(ranked) == 10 and len({name for _, name, _ in ranked}) == 10
    assert "4 more classes" in out


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mtil: error:")
    assert "Traceback" not in captured.err
    return lines[0]


def test_eval_single_unreadable_image(tmp_path, capsys):
    fake = tmp_path / "x.jpg"
    fake.write_text("this is text, not a JPEG\n")
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n")
    assert main(["--model", "micro-vit", "--device", "cpu", "--eval-single", str(fake),
                 "--class-names", str(names)]) == 2
    assert str(fake) in _one_error_line(capsys)

    missing = tmp_path / "missing.png"
    assert main(["--model", "micro-vit", "--eval-single", str(missing), "--class-names", str(names)]) == 2
    assert str(missing) in _one_error_line(capsys)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert main(["--model", "micro-vit", "--eval-single", str(fake), "--class-names", str(empty)]) == 2
    assert str(empty) in _one_error_line(capsys)


def test_missing_weights_and_data_reported_together(tmp_path, capsys, monkeypatch):
    calls = []

    def fail(url, root, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(clip_loading.clip_api, "_download", fail)
    data, weights = tmp_path / "EMPTY", tmp_path / "EMPTY2"
    code = main(["--model", "ViT-B/16", "--eval-only", "--eval-datasets", "DTD", "--data-location", str(data),
                 "--clip-root", str(weights), "--workers", "0"])
    assert code == 2
    line = _one_error_line(capsys)
    assert calls == [clip_loading.clip_api._MODELS["ViT-B/16"]]
    assert str(clip_loading.weights_file_for("ViT-B/16", weights)) in line
    assert "DTD" in line and str(data) in line
    assert "dtd/dtd" in line  # the expected layout


def test_unknown_dataset_on_the_command_line(tmp_path, capsys):
    assert main([*EVAL, "--eval-datasets", "ToyShape,Nope"]) == 2
    line = _one_error_line(capsys)
    assert "'Nope'" in line and "ToyShape" in line


def test_subprocess_eval_only(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "mtil.main", "--model", "micro-vit", "--eval-only", "--eval-datasets", "ToyShape",
         "--max-evaluation-size", "20", "--workers", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ToyShape" in done.stdout
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no --save: nothing written


def _train(save: Path, *flags: str) -> None:
    assert main(["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
                 "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu", "--iterations", "2",
                 "--save", str(save), *flags]) == 0


def test_summarize_labels_the_method_the_results_record(tmp_path, capsys):
    save = tmp_path / "chain"
    _train(save, "--method", "lwf", "--ref-batch-size", "4", "--train-dataset", "ToyShape")
    _train(save, "--method", "lwf", "--ref-batch-size", "4", "--train-dataset", "ToyColor", "--load",
           str(save / "ToyShape.pth"))
    (save / "summary.csv").unlink()
    assert main(["--summarize", str(save)]) == 0
    from mtil.evaluation import matrix as mx

    assert [row["method"] for row in mx.read_summary(save / "summary.csv")] == ["lwf"]


def test_eval_only_wise_ft_never_overwrites_the_checkpoints_own_rows(tmp_path, capsys):
    save = tmp_path / "run"
    _train(save, "--train-dataset", "ToyShape")
    own = (save / "metrics_ToyShape.csv").read_text()
    assert main(["--model", "micro-vit", "--workers", "0", "--device", "cpu", "--max-evaluation-size", "8",
                 "--eval-only", "--load", str(save / "ToyShape.pth"), "--wise-ft", "--alpha", "0",
                 "--eval-datasets", "ToyShape", "--save", str(save)]) == 0
    assert (save / "metrics_ToyShape.csv").read_text() == own
    assert (save / "metrics_ToyShape_wiseft0.csv").is_file()


def test_a_model_named_beside_load_must_be_the_loaded_one(tmp_path, capsys):
    save = tmp_path / "run"
    _train(save, "--train-dataset", "ToyShape")
    base = ["--workers", "0", "--device", "cpu", "--max-evaluation-size", "8", "--eval-only", "--load",
            str(save / "ToyShape.pth"), "--eval-datasets", "ToyShape"]
    assert main(["--model", "micro-vit", *base]) == 0
    capsys.readouterr()
    assert main(["--model", "tiny-vit", *base]) == 2
    err = capsys.readouterr().err
    assert "holds a micro-vit model, not --model tiny-vit" in err and err.count("\n") == 1


def test_eval_single_blends_with_wise_ft(tmp_path, capsys):
    save = tmp_path / "run"
    _train(save, "--train-dataset", "ToyShape", "--lr", "5e-2", "--iterations", "4")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (30, 200, 30)).save(image)
    names = tmp_path / "names.txt"
    names.write_text("square\ncircle\nstar\n")

    def ranking(*flags):
        assert main(["--workers", "0", "--device", "cpu", "--eval-single", str(image), "--class-names", str(names),
                     *flags]) == 0
        return re.findall(r"(\d+\.\d+)%", capsys.readouterr().out)

    checkpoint = ranking("--load", str(save / "ToyShape.pth"))
    zero_shot = ranking("--model", "micro-vit")
    assert checkpoint != zero_shot
    assert ranking("--load", str(save / "ToyShape.pth"), "--wise-ft", "--alpha", "0") == zero_shot
