"""ARGUMENTS.md: ``python -m mtil.arguments_doc > ARGUMENTS.md`` (``make arguments``; a test fails when the file
and the parsers differ).

Its own CLI module because it reads two parsers: mtil.main's (:mod:`mtil.args`) and the sweep runner's
(:mod:`mtil.sweep.cli`, which itself uses :mod:`mtil.args`), so neither has to import the other.
"""
from __future__ import annotations

import argparse

from mtil.args import build_parser
from mtil.sweep.cli import build_parser as sweep_parser


def arguments_markdown() -> str:
    """ARGUMENTS.md, generated from the parsers (mtil.main's, then the sweep runner's) so they cannot drift."""
    lines = [
        "# Arguments",
        "",
        "Generated from `mtil/args.py`, the method files in `mtil/methods/` and `mtil/sweep/cli.py` by "
        "`make arguments` (`python -m mtil.arguments_doc > ARGUMENTS.md`; a test fails when this file and the parsers "
        "differ).",
        "Multi-word flags accept hyphens or underscores (`--eval-only` or `--eval_only`). Every flag of "
        "`python -m mtil.main` can also be set in a `--config` YAML file (`lr: 1.0e-5`); the command line wins.",
        "",
    ]
    groups = [*build_parser()._action_groups, *sweep_parser()._action_groups]
    for group in groups:
        actions = [a for a in group._group_actions if a.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title}", ""]
        if group.description:
            lines += [group.description, ""]
        lines += ["| flag | default | description |", "| --- | --- | --- |"]
        for action in actions:
            names = ", ".join(f"`{n}`" for n in action.option_strings)
            default = action.default
            if default in (None, False, argparse.SUPPRESS) or default == {}:
                shown = ""
            elif isinstance(default, list):
                shown = f"`{','.join(map(str, default))}`"
            else:
                shown = f"`{default}`"
            text = (action.help or "").replace("|", "\\|")
            if action.choices and "choices" not in text.lower() and action.dest != "method":
                text += f" Choices: {', '.join(map(str, action.choices))}."
            lines.append(f"| {names} | {shown} | {text} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """ARGUMENTS.md on stdout; ``--spec`` writes mtil/assets/cli_spec.json instead (mtil.cli_spec)."""
    import sys

    if "--spec" in (sys.argv[1:] if argv is None else argv):
        from mtil.cli_spec import SPEC_FILE, write_spec

        write_spec(build_parser())
        print(f"wrote {SPEC_FILE}")
        return
    print(arguments_markdown(), end="")


if __name__ == "__main__":
    main()
