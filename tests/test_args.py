"""Flags: ARGUMENTS.md in sync with the parser, both spellings, one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from mtil import args as mtil_args
from mtil.arguments_doc import arguments_markdown
from mtil.main import main

REPO = Path(__file__).resolve().parents[1]


def test_arguments_md_matches_parser():
    path = REPO / "ARGUMENTS.md"
    assert path.is_file(), "ARGUMENTS.md is missing: generate it with `python -m mtil.arguments_doc > ARGUMENTS.md`"
    assert path.read_text() == arguments_markdown(), (
        "ARGUMENTS.md is out of date: regenerate it with `python -m mtil.arguments_doc > ARGUMENTS.md`"
    )


@pytest.mark.parametrize("module", ["mtil.arguments_doc", "mtil.args"])
def test_arguments_command_prints_the_markdown(module):
    """`python -m mtil.arguments_doc` (what the Makefile runs), and the older `python -m mtil.args` that the docs
    and ARGUMENTS.md's header name, print exactly that text."""
    done = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == arguments_markdown()


def test_arguments_markdown_lists_every_flag():
    text = arguments_markdown()
    parser = mtil_args.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        for option in action.option_strings:
            assert f"`{option}`" in text, option


def _multiword_actions():
    return [a for a in mtil_args.build_parser()._actions
            if a.dest != "help" and any("-" in o[2:] or "_" in o[2:] for o in a.option_strings)]


def test_every_multiword_flag_has_both_spellings():
    actions = _multiword_actions()
    assert actions, "expected multi-word flags such as --eval-only"
    for action in actions:
        for option in action.option_strings:
            body = option[2:]
            assert "--" + body.replace("-", "_") in action.option_strings, option
            assert "--" + body.replace("_", "-") in action.option_strings, option


@pytest.mark.parametrize(
    ("hyphen", "underscore", "dest", "value", "expected"),
    [
        ("--eval-only", "--eval_only", "eval_only", None, True),
        ("--batch-size-eval", "--batch_size_eval", "batch_size_eval", "7", 7),
        ("--max-evaluation-size", "--max_evaluation_size", "max_evaluation_size", "13", 13),
        ("--data-location", "--data_location", "data_location", "/somewhere", "/somewhere"),
        ("--eval-datasets", "--eval_datasets", "eval_datasets", "ToyShape, ToyColor", ["ToyShape", "ToyColor"]),
    ],
)
def test_both_spellings_parse_to_the_same_dest(hyphen, underscore, dest, value, expected):
    parsed = []
    for flag in (hyphen, underscore):
        argv = [flag] if value is None else [flag, value]
        parsed.append(mtil_args.parse_args(argv))
    default = mtil_args.parse_args([])
    assert getattr(parsed[0], dest) == getattr(parsed[1], dest) == expected
    assert getattr(default, dest) != expected  # the flag really changed something
    typed = {"_argv"}  # the command line as typed differs by its spelling, by design
    assert ({k: v for k, v in vars(parsed[0]).items() if k not in typed}
            == {k: v for k, v in vars(parsed[1]).items() if k not in typed})


def _assert_one_line_error(capsys, argv, *fragments):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mtil: error:"), lines[0]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--batch-size-eval", "0"], ["--batch-size-eval", "0"]),
        (["--batch_size_eval", "-3"], ["--batch-size-eval", "-3"]),
        (["--max-evaluation-size", "0"], ["--max-evaluation-size"]),
        (["--workers", "-1"], ["--workers"]),
        (["--workers", "two"], ["--workers", "two"]),
        (["--prompt", "a photo of a cat"], ["--prompt", "{}"]),
        (["--prompt", "{} and {}"], ["--prompt"]),
        (["--eval-single", "x.jpg"], ["--class-names"]),
        (["--no-such-flag"], ["--no-such-flag"]),
        (["--eval-only", "stray-positional"], ["stray-positional"]),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(capsys, argv, fragments):
    _assert_one_line_error(capsys, argv, *fragments)


def test_bad_flags_never_reach_the_jobs(monkeypatch, capsys):
    """Validation happens before anything heavy runs."""
    import mtil.main as mtil_main

    def must_not_run(args: argparse.Namespace) -> int:
        raise AssertionError("run() reached with invalid flags")

    monkeypatch.setattr(mtil_main, "run", must_not_run)
    _assert_one_line_error(capsys, ["--batch-size-eval", "0"])


def test_prompt_with_another_format_field_is_a_one_line_error(tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    _assert_one_line_error(capsys, ["--model", "micro-vit", "--eval-single", str(image), "--class-names",
                                    str(names), "--prompt", "a {} in {style}", "--device", "cpu"], "--prompt")


@pytest.mark.parametrize("flags", [["--train-dataset", "ToyShape"], ["--lora"], ["--we"], ["--method", "ZSCL"],
                                   ["--orthogonal-gradients", "3"]])
def test_training_flags_with_eval_only_are_refused(flags, capsys):
    """A training flag under --eval-only would parse and do nothing: one line, exit 2."""
    assert main(["--model", "micro-vit", "--eval-only", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flags[0] in err[0] and "--eval-only" in err[0]
