"""The helpers' --help shows each flag's default, as mtil.main's does (found in the docs review: mtil.imo and
mtil.demo hid theirs), and never a meaningless "(default: None)" or a default stated twice."""
from __future__ import annotations

import re

import pytest

from mtil import demo
from mtil.imo import build_parser


def _demo_help(capsys) -> str:
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    return capsys.readouterr().out


def test_imo_help_shows_its_defaults_once():
    parser = build_parser()
    text = " ".join(parser.format_help().split())
    assert "Passes over the training set. (default: 10)" in text
    assert re.search(r"--width WIDTH [^-]*\(default: 64\)", text)
    assert "(default: None)" not in text
    formatter = parser.formatter_class(parser.prog)
    for action in parser._actions:  # a default the help states is not appended again
        assert formatter._get_help_string(action).replace("%(default)s", "").count("default") <= 1, action.option_strings


def test_demo_help_shows_its_defaults(capsys):
    text = " ".join(_demo_help(capsys).split())
    assert "(default: ckpt/demo)" in text and "(default: 0,1,2)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
