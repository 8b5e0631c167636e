"""The CLIP-AST seeds' own command runs (issue 25: its --root, --config-file, --output-dir and Dassl's trailing
KEY VALUE overrides were "unrecognized arguments"): each spelling is read with its tool's meaning, with a note
naming mtil's flag, or refused in one line saying what to give instead."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mtil.args import parse_args
from mtil.errors import UserError
from mtil.main import main, parser_switches
from mtil.seed_flags import translate_main

REPO = Path(__file__).resolve().parents[1]
# seed 000/001's quick start, verbatim but for the paths, the device (this machine has no GPU) and the model
SEED_COMMAND = ("--root {data} --config-file {repo}/configs/clip_ast_few_shot.yaml --output-dir {out} --device cpu "
                "--stage1-epochs 1 --stage2-epochs 30 --k 6")


def test_the_seeds_quick_start_runs(tmp_path, capsys):
    dataset = tmp_path / "toy.yaml"  # Dassl's dataset configuration (the seed's --dataset-config-file)
    dataset.write_text("DATASET:\n  NAME: ToyColorB\n  NUM_SHOTS: 2\n")
    out = tmp_path / "output" / "clip_ast"
    argv = shlex.split(SEED_COMMAND.format(data=tmp_path / "data", repo=REPO, out=out))
    assert main([*argv, "--model", "toyclip", "--dataset-config-file", str(dataset), "--workers", "0",
                 "--max-evaluation-size", "40"]) == 0
    err = capsys.readouterr().err
    assert "--root is --data-location in mtil" in err and "--output-dir is --save in mtil" in err
    assert (out / "accuracy_matrix.csv").is_file() and (out / "ast_selection_ToyColorB.json").is_file()


def test_dassl_overrides_take_their_meaning():
    argv = translate_main(["--method", "ast", "--shots", "2", "--iterations", "1",
                           "LMBD", "[1.0,", "1.0,", "0.5]", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.LR",
                           "1e-6", "DATASET.NAME", "DescribableTextures"])
    args = parse_args(argv)
    assert args.lmbd == [1.0, 1.0, 0.5] and args.batch_size == 8 and args.stage2_lr == 1e-6
    assert args.train_dataset == "DTD"  # Dassl's DescribableTextures


@pytest.mark.parametrize(("argv", "fragment"), [
    (["OPTIM.GRAD_ACCUMULATION_STEPS", "4"], "no gradient accumulation"),
    (["--resume", "output/clip_ast"], "run the same command again with the same --save"),
    (["--eval-only", "--model-dir", "out", "--load-epoch", "30"], "--load DIR/<Dataset>.pth"),
    (["--eval-freq", "5"], "--eval-interval STEPS"),
    (["FOO.BAR", "1"], "unknown Dassl override FOO.BAR"),
    (["LMBD", "[1.0,", "2.0"], "no closing ']'"),
])
def test_what_mtil_does_without_is_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


@pytest.mark.parametrize("spec", ["shipped", "stale"])  # a stale spec (an edited source) once lost the switches
def test_a_bare_upper_case_value_is_left_alone(spec, monkeypatch):
    if spec == "stale":
        monkeypatch.setattr("mtil.cli_spec.load_spec", lambda *a, **k: None)

    def translate(argv):  # as mtil.main calls it: the full parser's switches when the spec is stale
        return translate_main(argv, parser_switches)

    assert translate(["--train-dataset", "SUN397", "--k", "6"]) == ["--train-dataset", "SUN397", "--k", "6"]
    # a flag's value that looks like a Dassl key stays that flag's value (found in review: --save RUN.1)
    assert translate(["--save", "RUN.1", "--k", "6"]) == ["--save", "RUN.1", "--k", "6"]
    assert translate(["--class-names", "CLASSES.TXT", "K", "6"])[-2:] == ["--k", "6"]
    assert translate(["--random-selection", "K", "6"]) == ["--random-selection", "--k", "6"]  # a switch
    with pytest.raises(UserError, match="Dassl override K has no value"):
        translate(["K"])


IMO_SEED = ("--output_dir /model-output-dir --data_root /data-dir --epochs 10 --distributed --batch_size 40 "
            "--momentum_teacher 0.9998 --adapter_train --freeze_last_layer 0 --lr 0.0008 --warmup_epochs 2 "
            "--warmup_teacher_temp_epochs 3")


def test_the_imo_seeds_dino_command_takes_its_meaning(monkeypatch, capsys):
    """Seed 004's dino_clip_training.py command under torchrun on 3 processes (WORLD_SIZE 3): mode dino, the
    folder, its Open Images list as a CSV set whose images are under --oi_root, and the seed's --lr read as DINO's
    base rate, 0.0008 x 40 x 3 / 256 = 3.75e-4, mtil's documented peak for that command."""
    from mtil.imo import build_parser
    from mtil.seed_flags import translate_imo

    monkeypatch.setenv("WORLD_SIZE", "3")
    argv = translate_imo([*IMO_SEED.split(), "--oi_root", "/open-images-dir", "--images_path", "/ids.csv",
                          "--model", "micro-vit"])
    options = build_parser().parse_args(argv)
    assert (options.save, options.mode, options.data_location) == ("/model-output-dir", "dino", "/open-images-dir")
    assert options.data == "CSV:/ids.csv"
    assert options.lr == pytest.approx(3.75e-4) and options.warmup_teacher_epochs == 3
    assert (options.epochs, options.batch_size, options.momentum_teacher) == (10, 40, 0.9998)
    assert "peak --lr 0.000375" in capsys.readouterr().err
    equals = translate_imo(["--adapter_train", "--batch_size=40", "--lr=0.0008", "--data", "ToyShape"])
    assert equals[-2:] == ["--lr", "0.000375"]  # --batch_size=40 read too: 0.0008 x 40 x 3 processes / 256
    assert translate_imo(["--data", "ToyShape", "--lr", "0.0008", "--save", "x"]) == \
        ["--data", "ToyShape", "--lr", "0.0008", "--save", "x"]  # mtil's own spelling: --lr is the peak


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--freeze_last_layer", "1"], "never freezes"),
])
def test_what_mtil_imo_does_without_is_one_line(extra, fragment, monkeypatch, capsys):
    from mtil.imo import main as imo_main

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert imo_main([*IMO_SEED.split(), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and err[-1].startswith("mtil.imo: error:"), err


def test_distributed_outside_torchrun_is_one_line(monkeypatch, capsys):
    from mtil.imo import main as imo_main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert imo_main(IMO_SEED.split()) == 2
    assert "start the command with torchrun" in capsys.readouterr().err


def test_the_imo_seeds_open_images_list_trains_the_adapter(tmp_path, monkeypatch, capsys):
    """Its list (ImageID, DisplayName, type) read as the seed's script reads it: <oi_root>/<ImageID>.jpg labelled
    by DisplayName. The seed's command, but for paths, model, one process (no --distributed) and a short run."""
    from PIL import Image

    from mtil.imo import main as imo_main

    images = tmp_path / "open-images"
    images.mkdir()
    rows = ["ImageID,DisplayName,type"]
    for index in range(16):
        Image.new("RGB", (16, 16), (index * 15, 255 - index * 15, 40)).save(images / f"id{index:03d}.jpg")
        rows.append(f"id{index:03d},{'Cat' if index % 2 else 'Dog'},train")
    listing = tmp_path / "ids.csv"
    listing.write_text("\n".join(rows) + "\n")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = (f"--output_dir {tmp_path / 'out'} --data_root {tmp_path / 'dassl'} --epochs 1 --batch_size 4 "
            f"--momentum_teacher 0.9998 --adapter_train --freeze_last_layer 0 --lr 0.0008 --oi_root {images} "
            f"--images_path {listing} --warmup_epochs 0 --warmup_teacher_temp_epochs 0").split()
    assert imo_main([*argv, "--model", "micro-vit", "--device", "cpu", "--workers", "0", "--local-crops", "2",
                     "--dino-out-dim", "64"]) == 0
    assert (tmp_path / "out" / "imo_adapter.pt").is_file()
    err = capsys.readouterr().err
    assert "--images_path" in err and "is --data CSV:" in err
