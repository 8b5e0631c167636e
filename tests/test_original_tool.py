"""Users arrive with the original tool's commands (its README, ../shared/seeds/003_*). Each one runs here, or is
refused in one line that names what is missing (weights, data) — never "unrecognized arguments". Then the same
command on a tiny model and the built-in data runs to the end, so every flag it uses really works."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mtil.args import parse_args
from mtil.datasets.registry import open_dataset
from mtil.main import main
from mtil.methods.reference_distillation import LwF
from tests.helpers import load

REPO = Path(__file__).resolve().parents[1]

# The original README's commands, verbatim (`python -m src.main` and the root scripts are kept as entry points).
FINETUNE = ["--method", "finetune", "--train-mode", "whole", "--train-dataset", "DTD", "--iterations", "1000",
            "--lr", "1e-5", "--save", "ckpt/dtd_ft"]
ZSCL = ["--method", "ZSCL", "--train-mode", "whole", "--train-dataset", "DTD", "--ref-dataset", "ImageNet",
        "--ref-sentences", "conceptual_captions", "--iterations", "1000", "--lr", "1e-5", "--save", "ckpt/dtd_zscl"]
EVAL_ONLY = ["--load", "ckpt/dtd_ft/DTD.pth", "--eval-datasets", "DTD,CIFAR100", "--eval-only"]
EVAL_SINGLE = ["--load", "ckpt/dtd_ft/DTD.pth", "--eval-single", "path/to/image.jpg", "--class-names",
               "data/text_classes/imagenet_classes.txt", "--eval-only"]
LORA = [*FINETUNE, "--lora", "--lora-r", "8", "--lora-alpha", "16"]
LORA_SHARED = [*FINETUNE, "--lora", "--lora-shared", "--lora-r", "8", "--lora-alpha", "16"]
LORA_SPLIT = [*FINETUNE, "--lora", "--lora-shared", "--lora-shared-split-qkvo", "--lora-r", "8", "--lora-alpha", "16"]
LORA_ORIGINAL_DEFAULTS = [*FINETUNE, "--lora", "--lora-target-modules", "attn.out_proj,mlp.c_fc,mlp.c_proj",
                          "--lora-dropout", "0.1"]
MOVING_AVG = [*FINETUNE, "--moving-avg"]
# The README writes the OGD workflow's other flags as "..."; a length is one of them (without it the one-line
# refusal says "training needs a length: give --iterations N").
OGD_TASK1 = ["--method", "finetune", "--train-dataset", "DTD", "--orthogonal-gradients", "10", "--save",
             "ckpt/ogd/task1", "--iterations", "1000"]
OGD_TASK2 = ["--method", "finetune", "--train-dataset", "Flowers", "--orthogonal-gradients", "10",
             "--orthogonal-gradients-path", "ckpt/ogd/task1/grad_DTD.pth", "--save", "ckpt/ogd/task2",
             "--iterations", "1000"]
CHAIN = [["--method", "ZSCL", "--train-mode", "whole", "--train-dataset", ds, "--ref-dataset", "ImageNet",
          "--ref-sentences", "conceptual_captions", "--iterations", "1000", "--lr", "1e-5", "--save",
          "ckpt/zscl_run", *load_arg] for ds, load_arg in (("DTD", []), ("Flowers", ["--load", "ckpt/zscl_run/DTD.pth"]))]
TRAINING = {"finetune": FINETUNE, "zscl": ZSCL, "lora": LORA, "lora-shared": LORA_SHARED, "lora-split": LORA_SPLIT,
            "lora-original-defaults": LORA_ORIGINAL_DEFAULTS, "moving-avg": MOVING_AVG, "ogd-task1": OGD_TASK1}


def _tiny(argv: list[str]) -> list[str]:
    """The same command on a tiny model and the built-in data (names swapped, flags kept)."""
    swap = {"DTD": "ToyShape", "Flowers": "ToyColor", "DTD,CIFAR100": "ToyShape,ToyColor", "ImageNet": "ToyCaptions",
            "conceptual_captions": "ToyCaptions", "1000": "3", "10": "2", "ckpt/dtd_ft/DTD.pth": "ckpt/dtd_ft/ToyShape.pth",
            "ckpt/zscl_run/DTD.pth": "ckpt/zscl_run/ToyShape.pth",
            "ckpt/ogd/task1/grad_DTD.pth": "ckpt/ogd/task1/grad_ToyShape.pth"}
    out = [swap.get(a, a) for a in argv]
    extra = ["--model", "micro-vit", "--workers", "0", "--device", "cpu"]
    if "--eval-single" not in argv:
        extra += ["--max-evaluation-size", "16"]
    if "--eval-only" not in argv:
        extra += ["--batch-size", "8", "--warmup-length", "1"]
    if "--method" in argv and out[out.index("--method") + 1] == "ZSCL":
        extra += ["--ref-sentences-count", "50", "--ref-batch-size", "8"]
    return out + extra


def _assert_runs_or_names_what_is_missing(argv: list[str], capsys) -> None:
    code = main(argv)
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    assert "Traceback" not in captured.err
    if code == 2:
        lines = captured.err.splitlines()
        assert len(lines) == 1, captured.err
        assert "unrecognized arguments" not in lines[0] and "invalid choice" not in lines[0], lines[0]
        assert any(word in lines[0] for word in ("missing", "not found", "does not exist")), lines[0]


@pytest.mark.parametrize("name", list(TRAINING))
def test_original_training_commands_run(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no weights or datasets here, as on a new machine
    _assert_runs_or_names_what_is_missing(TRAINING[name], capsys)
    assert not Path("ckpt").exists()  # refused before anything was written
    assert main(_tiny(TRAINING[name])) == 0, capsys.readouterr().err


def test_original_evaluation_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (EVAL_ONLY, EVAL_SINGLE):
        _assert_runs_or_names_what_is_missing(argv, capsys)
    assert main(_tiny(FINETUNE)) == 0
    capsys.readouterr()
    assert main(_tiny(EVAL_ONLY)) == 0
    assert "ToyShape" in capsys.readouterr().out
    Path("path/to").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save("path/to/image.jpg")
    Path("data/text_classes").mkdir(parents=True)
    Path("data/text_classes/imagenet_classes.txt").write_text("red square\nblue circle\n")
    assert main(_tiny(EVAL_SINGLE)) == 0
    assert "red square" in capsys.readouterr().out


def test_original_workflows_chain_and_ogd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in CHAIN:  # the README's shell loop: one process per dataset, --load the previous checkpoint
        assert main(_tiny(argv)) == 0
    assert load(Path("ckpt/zscl_run/ToyColor.pth"))["state"]["completed"] == ["ToyShape", "ToyColor"]
    assert main(_tiny(OGD_TASK1)) == 0
    assert main(_tiny(OGD_TASK2)) == 0
    assert load(Path("ckpt/ogd/task2/latest.pth"))["methods"]["ogd"]["tasks"] == ["ToyShape", "ToyColor"]


def _run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_original_entry_points_and_scripts(tmp_path, monkeypatch):
    """`python -m src.main`, `python list_clip_layers.py`, `python convert_grad_to_basis.py`, from the root."""
    shown = _run_script(["-m", "src.main", "--help"], REPO)
    assert shown.returncode == 0 and "--train-dataset" in shown.stdout, shown.stderr
    for flag in ("--linear-only", "--params"):
        listed = _run_script(["list_clip_layers.py", flag], REPO)  # ViT-B/16 by default: names need no weights
        assert listed.returncode == 0 and "mlp.c_fc" in listed.stdout, listed.stderr
    monkeypatch.chdir(tmp_path)
    assert main(_tiny([*OGD_TASK1, "--ogd-save-raw"])) == 0
    for source in ("grad_raw_ToyShape.pth", "grad_ToyShape.pth"):  # raw gradients, and mtil's basis file itself
        done = _run_script([str(REPO / "convert_grad_to_basis.py"), "--input", f"ckpt/ogd/task1/{source}",
                            "--output", "basis_DTD.pth"], tmp_path)
        assert done.returncode == 0, done.stderr
        basis = torch.load(tmp_path / "basis_DTD.pth", weights_only=True)["basis"]
        assert basis and all(b.shape[0] >= 1 for b in basis.values())
    kept = torch.load(tmp_path / "basis_DTD.pth", weights_only=True)["basis"]
    original = torch.load(tmp_path / "ckpt/ogd/task1/grad_ToyShape.pth", weights_only=True)["basis"]
    assert all(torch.equal(kept[n], original[n]) for n in original)  # a basis passes through unchanged


def test_setup_files_of_the_original_readme_exist():
    requirements = (REPO / "requirements.txt").read_text()
    assert "torch==2.14.1" in requirements and "-e .[test,trackers]" in requirements
    assert "torch==2.14.1" in (REPO / "environment.yml").read_text()


def test_moving_avg_is_an_ema_with_a_documented_decay():
    base = ["--train-dataset", "ToyShape"]
    assert parse_args([*base, "--moving-avg"]).ema == 0.999
    assert parse_args([*base, "--moving_avg", "0.99"]).ema == 0.99
    assert parse_args([*base, "--ema"]).ema == 0.999
    assert parse_args(base).ema is None


@pytest.mark.parametrize(("choice", "per_class"), [("first-template", 1), ("all-templates", None)])
def test_lwf_sentences_are_the_originals_by_default(choice, per_class):
    config = parse_args(["--train-dataset", "ToyShape", "--method", "lwf"]
                        + ([] if choice == "first-template" else ["--lwf-sentences", choice]))
    assert config.lwf_sentences == choice
    data = open_dataset("ToyShape")
    task = type("Task", (), {"data": data})()
    sentences = LwF(config).reference_sentences(None, task)
    templates = data.templates[:per_class] if per_class else data.templates
    assert sentences == [t.format(c) for c in data.classnames for t in templates]
    assert len(data.templates) > 1  # so the two choices really differ
