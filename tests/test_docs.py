"""The documentation: the site builds with no warning, the README stays short, every command the README and the
getting-started page show parses with the parser of its entry point, and the offline quick start runs.

Which commands are checked: every line of a fenced shell block (bash, sh, console or unlabelled) and every inline
code span of README.md and docs/getting-started.md that runs ``python -m mtil.main``, ``mtil.sweep``, ``mtil.imo``
or ``mtil.demo`` (also under ``torchrun ... -m``); a line ending in ``\\`` continues on the next. A command whose
comment says ``(placeholder`` stands for a shape, not a runnable line, and is skipped. The fenced blocks right after
a ``<!-- test: run -->`` line are the offline quick start: they are run, in order, in a temporary folder.
"""
from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GETTING_STARTED = REPO / "docs" / "getting-started.md"
PAGES = (README, GETTING_STARTED)
README_MAX_LINES = 200
ENTRY_POINTS = ("mtil.main", "mtil.sweep", "mtil.imo", "mtil.demo")
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
RUN_MARKER = "<!-- test: run -->"
PLACEHOLDER = "(placeholder"


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str
    module: str
    argv: tuple[str, ...]
    run: bool  # in a block marked to be run (the offline quick start)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _entry_point(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) of ``... -m mtil.X args`` in a command's tokens, or None."""
    for i, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[i + 1] in ENTRY_POINTS:
            return tokens[i + 1], tokens[i + 2:]
    return None


def _command(page: str, line: int, text: str, run: bool) -> Command | None:
    if PLACEHOLDER in text:
        return None
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as exc:  # unbalanced quotes: report it as the command's failure
        return Command(page, line, text, "shlex", (str(exc),), run)
    found = _entry_point(tokens)
    if found is None:
        return None
    return Command(page, line, text, found[0], tuple(found[1]), run)


def commands_of(path: Path) -> list[Command]:
    """Every mtil command of a Markdown page (see the module's docstring)."""
    page = path.relative_to(REPO).as_posix()
    lines = path.read_text(encoding="utf-8").split("\n")
    found: list[Command] = []
    fence, run_next, run_block = None, False, False
    pending, start = "", 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        opening = re.match(r"^(`{3,}|~{3,})\s*([\w-]*)", stripped)
        if fence is None:
            if stripped == RUN_MARKER:
                run_next = True
                continue
            if opening:
                fence = (opening.group(1), opening.group(2).lower())
                run_block, run_next = run_next, False
                continue
            if stripped:
                run_next = False
            for span in re.findall(r"`([^`]+)`", raw):  # inline code: a whole command with flags
                if re.match(r"^(python3?|torchrun|srun)\b", span) and " --" in span and "…" not in span:
                    command = _command(page, number, span, run=False)
                    if command is not None:
                        found.append(command)
            continue
        if stripped.startswith(fence[0]) and stripped.strip("`~") == "":
            fence, pending = None, ""
            continue
        if fence[1] not in SHELL_FENCES:
            continue
        text = raw.strip()
        text = text[2:] if text.startswith("$ ") else text
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        command = _command(page, start, pending + text, run_block)
        pending = ""
        if command is not None:
            found.append(command)
    return found


ALL_COMMANDS = [c for path in PAGES for c in commands_of(path)]
RUN_COMMANDS = list({c.text: c for c in ALL_COMMANDS if c.run}.values())  # README and the page share them


# ------------------------------------------------------------------------------------------------ (a) the site
class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_site_builds_with_no_warning(tmp_path, monkeypatch):
    """``mkdocs build --strict`` (what ``make docs`` runs): any warning (a broken link or anchor, a page missing from
    the nav, a marker naming a file or flag group that does not exist) fails the build."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' (make test installs it)")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[docs]'")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import MkDocsException

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    site = tmp_path / "site"
    warnings = _Collect()
    logger = logging.getLogger("mkdocs")
    logger.addHandler(warnings)
    try:
        config = load_config(config_file=str(REPO / "mkdocs.yml"), site_dir=str(site), strict=True)
        try:
            build(config)
        except (MkDocsException, SystemExit) as exc:
            pytest.fail(f"mkdocs build --strict failed: {exc}\n" + "\n".join(warnings.messages))
    finally:
        logger.removeHandler(warnings)
    assert not warnings.messages, "\n".join(warnings.messages)
    assert (site / "index.html").is_file() and (site / "reference" / "arguments.html").is_file()
    reference = (site / "reference" / "arguments.html").read_text(encoding="utf-8")
    assert "--train-dataset" in reference, "the flag reference was not generated"


# ------------------------------------------------------------------------------------------------ (b) the README
def test_the_readme_is_at_most_200_lines():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, f"README.md has {count} lines (at most {README_MAX_LINES}): move the rest " \
                                      f"into a page under docs/"


def test_the_pages_show_commands_and_a_quick_start():
    """The extraction found what the checks below need (an empty list would make them pass vacuously)."""
    for path in PAGES:
        page = path.relative_to(REPO).as_posix()
        assert any(c.page == page and c.module == "mtil.main" for c in ALL_COMMANDS), f"no mtil command in {page}"
        assert any(c.page == page and c.run for c in ALL_COMMANDS), f"{page} has no {RUN_MARKER} quick start"


# ------------------------------------------------------------------------------------------------ (c) they parse
def _parse(command: Command) -> None:
    """Parse ``command`` with its entry point's parser and the checks that need no files; raise on bad input."""
    argv = list(command.argv)
    if command.module == "shlex":
        raise ValueError(f"cannot split the command: {argv[0]}")
    if command.module == "mtil.main":
        from mtil.args import parse_args

        parse_args(_translated("translate_main", argv))
    elif command.module == "mtil.sweep":
        from mtil.sweep.cli import build_parser, plan

        plan(build_parser().parse_args(argv))  # every point's command through mtil's parser; writes nothing
    elif command.module == "mtil.imo":
        from mtil.adapters.imo_train import resolve_settings
        from mtil.imo import build_parser

        resolve_settings(vars(build_parser().parse_args(_translated("translate_imo", argv))))
    elif command.module == "mtil.demo":
        _parse_demo(argv)
    else:  # pragma: no cover - ENTRY_POINTS lists the modules above
        raise AssertionError(command.module)


def _translated(function: str, argv: list[str]) -> list[str]:
    """``argv`` as the entry point's main() reads it: the seeds' own spellings (``--root``, Dassl's ``KEY VALUE``
    overrides, ``--output_dir``) in mtil's names (``mtil.seed_flags``, where this mtil has it)."""
    try:
        from mtil import seed_flags
    except ImportError:
        return argv
    translate = getattr(seed_flags, function, None)
    return translate(argv) if translate is not None else argv


class _Parsed(Exception):
    pass


def _parse_demo(argv: list[str]) -> None:
    """The demo builds its parser inside main(): run main() up to the experiment, which is replaced."""
    from mtil import demo

    def stop(*args, **kwargs):
        raise _Parsed

    original = demo.experiment
    demo.experiment = stop
    try:
        code = demo.main(argv)
    except _Parsed:
        return
    finally:
        demo.experiment = original
    raise ValueError(f"python -m mtil.demo refused its arguments (exit code {code})")


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.id for c in ALL_COMMANDS])
def test_every_command_parses(command, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # relative paths (--config configs/...) are the repository's
    try:
        _parse(command)
    except SystemExit as exc:
        pytest.fail(f"{command.id}: {command.text}\n  exits with {exc.code}: {capsys.readouterr().err.strip()}")
    except Exception as exc:  # noqa: BLE001 - the message is the point
        pytest.fail(f"{command.id}: {command.text}\n  does not parse: {exc}")


# ------------------------------------------------------------------------------------------------ (d) they run
def test_the_offline_quick_start_runs(tmp_path, monkeypatch):
    """The quick start's commands, in order, in an empty folder: each exits 0, and the first's matrix shows what the
    pages say it shows (a task learned, and a task known before training partly lost)."""
    import pandas as pd

    from mtil.main import main

    assert RUN_COMMANDS, f"no {RUN_MARKER} block in {', '.join(p.name for p in PAGES)}"
    shown = {page: [c.text for c in ALL_COMMANDS if c.run and c.page == page]
             for page in (p.relative_to(REPO).as_posix() for p in PAGES)}
    assert len({tuple(texts) for texts in shown.values()}) == 1, \
        f"the pages show different quick starts (keep them the same): {shown}"
    monkeypatch.chdir(tmp_path)
    for command in RUN_COMMANDS:
        assert command.module == "mtil.main", f"{command.id}: only python -m mtil.main commands are run here"
        code = main(list(command.argv))
        assert code == 0, f"{command.id}: {command.text}\n  exited with code {code}"
    first = RUN_COMMANDS[0]
    save = Path(first.argv[first.argv.index("--save") + 1])
    matrix = pd.read_csv(save / "accuracy_matrix.csv").pivot(index="after_task", columns="dataset", values="top1")
    assert matrix.loc[1, "ToyColorB"] >= matrix.loc[0, "ToyColorB"] + 20, f"ToyColorB not learned:\n{matrix}"
    assert matrix.loc[2, "ToyColorA"] <= matrix.loc[0, "ToyColorA"] - 10, f"ToyColorA not worn away:\n{matrix}"
    assert (save / "summary.csv").is_file() and (save / "ToyBackground.pth").is_file()
    last = RUN_COMMANDS[-1]
    reports = Path(last.argv[last.argv.index("--save") + 1]) / "reports"
    assert (reports / "ToyColorA" / "summary.json").is_file(), "the evaluation wrote no classification report"
