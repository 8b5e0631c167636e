"""No arguments, --help and a flag error are answered before torch is imported (issue 25: --help took 6 s, no
arguments failed on missing ViT-B/16 weights after 9.5 s), from mtil/assets/cli_spec.json, with argparse's own
messages: word for word what the full parser says."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtil.args import build_parser, parse_args
from mtil.cli_spec import (NO_ARGUMENTS, SPEC_FILE, answer_from_spec, load_spec, quick_answer, source_fingerprint,
                           spec_of)
from mtil.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec() -> dict:
    return spec_of(build_parser())


def test_the_shipped_spec_describes_this_source(spec):
    shipped = json.loads(SPEC_FILE.read_text())
    assert shipped["fingerprint"] == source_fingerprint(), "mtil/assets/cli_spec.json is stale: run `make arguments`"
    assert shipped["flags"] == spec["flags"] and shipped["help"] == spec["help"]


@pytest.mark.parametrize("argv", [
    ["--lrr", "3"],
    ["--metod", "ZSCL", "--train-dataset", "ToyShape"],
    ["--method", "zscl", "--train-dataset", "ToyShape"],
    ["--precision", "fp64"],
    ["--eval-only", "stray-positional"],
    ["--lr"],
    ["--train-dataset", "ToyShape", "--no-such-flag=3"],
])
def test_a_flag_error_is_the_full_parsers_own_line(argv, spec, capsys):
    assert answer_from_spec(argv, spec) == 2
    quick = capsys.readouterr().err.strip()
    with pytest.raises(UserError) as raised:
        parse_args(argv)
    assert quick == f"mtil: error: {raised.value}"


def test_valid_flags_are_left_to_the_full_parser(spec, capsys):
    assert answer_from_spec(["--train-dataset", "ToyShape", "--lr", "not-a-number"], spec) is None  # a value: later
    assert answer_from_spec(["--model", "toyclip", "--eval-only", "--we", "--no-we"], spec) is None
    assert capsys.readouterr().err == ""


def test_help_and_no_arguments(spec, capsys):
    assert answer_from_spec(["--train-dataset", "X", "--help"], spec) == 0
    assert capsys.readouterr().out == spec["help"] and "--eval-sample-seed" in spec["help"]
    assert quick_answer([], spec) == 2
    assert capsys.readouterr().err == f"mtil: error: {NO_ARGUMENTS}\n"  # one line, as every error
    assert "usage: python -m mtil.main" in NO_ARGUMENTS


def test_plugins_and_methods_registered_in_process_go_to_the_full_parser(spec, monkeypatch):
    """A plugin's flags and methods are not in the shipped spec: the full parser answers (tests/test_registry.py
    runs a plugin's --help and flags)."""
    assert "mtil.registry" in sys.modules  # this process built the full parser: nothing would be saved either
    assert quick_answer(["--no-such-flag"], spec) is None
    monkeypatch.delitem(sys.modules, "mtil.registry")
    assert quick_answer(["--no-such-flag"], spec) == 2
    monkeypatch.setenv("MTIL_PLUGINS", "my_plugin.py")
    assert quick_answer(["--no-such-flag"], spec) is None


def test_a_stale_spec_answers_nothing(tmp_path, spec):
    stale = tmp_path / "spec.json"
    stale.write_text(json.dumps({**spec, "fingerprint": "0" * 64}))
    assert load_spec(stale) is None
    stale.write_text("{not json")
    assert load_spec(stale) is None


def test_help_and_a_flag_error_do_not_import_torch():
    code = ("import sys, mtil.main\n"
            "codes = [mtil.main.main(['--help']), mtil.main.main(['--lrr', '3']), mtil.main.main([])]\n"
            "print('RESULT', codes, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "RESULT [0, 2, 2] False" in done.stdout, done.stdout[-500:] + done.stderr[-500:]
