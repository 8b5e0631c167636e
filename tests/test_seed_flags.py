"""The CLIP-AST seeds' own command runs (issue 25: its --root, --config-file, --output-dir and Dassl's trailing
KEY VALUE overrides were "unrecognized arguments"): each spelling is read with its tool's meaning, with a note
naming mtil's flag, or refused in one line saying what to give instead."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mtil.args import parse_args
from mtil.errors import UserError
from mtil.main import main
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


def test_a_bare_upper_case_value_is_left_alone():
    assert translate_main(["--train-dataset", "SUN397", "--k", "6"]) == ["--train-dataset", "SUN397", "--k", "6"]
    with pytest.raises(UserError, match="Dassl override K has no value"):
        translate_main(["K"])
