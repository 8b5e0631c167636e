"""mkdocs hooks of mtil's documentation site: markers in HTML comments that a page holds, replaced at build time.

Nothing a page shows is copied by hand from another file; a page names its source with a marker instead:

* ``<!-- include: PATH -->`` ... ``<!-- /include -->``: the file PATH (relative to the repository root, e.g.
  ``RELIABILITY.md``) replaces everything between the two markers (there, a line for readers of the raw file on
  GitHub, such as a link to PATH). Relative links of the included file are rewritten for the page: a file under
  ``docs/`` or one of the root files the site shows (:data:`SITE_PAGES`) becomes a link to its page; a link to any
  other file of the repository becomes its path in code. ``<!-- include: PATH shift=1 -->`` moves every heading
  of the included file one level down (``#`` becomes ``##``), for a file shown as a section of a page.
* ``<!-- arguments -->`` ... ``<!-- /arguments -->``: the flag reference that ``python -m mtil.arguments_doc``
  prints (``mtil.arguments_doc.arguments_markdown``), generated from the parsers at every build.
* ``<!-- flags: GROUP -->``: the table of one flag group of that reference (its title as ``--help`` shows it,
  e.g. ``CLIP-AST (--method ast)``), for a method's page.
* ``<!-- csv: PATH -->``: the CSV file PATH (relative to ``docs/``, e.g. ``results/bench_integrity.csv``) as a
  Markdown table; measured results live as CSV with their date, commit, machine and command. Options follow the
  path (quoted as in a shell where they hold spaces): ``once=date,commit,machine,command`` writes each of those
  columns whose value is the same in every row once, under the table, instead of as a column (a column whose rows
  differ stays a column); ``bold="COLUMN:VALUE,VALUE"`` shows the cells of COLUMN that hold one of the values in
  bold (a value no cell holds stops the build, so a re-measured file is noticed). Without options every column is
  shown, in the file's order.

A marker that names a file, group or section that does not exist stops the build with a one-line error, so a
renamed flag group or a moved file is noticed by ``make docs`` (and by ``tests/test_docs.py``).

Besides, outside code, ``<`` before a name that is not an HTML tag (``<Dataset>``, ``<save>``) is written as
``&lt;`` on every page, so placeholders of the generated flag tables and the included files are shown instead of
being swallowed as unknown HTML.
"""
from __future__ import annotations

import csv
import io
import posixpath
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

from mkdocs.exceptions import PluginError

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

# Files outside docs/ that the site shows, and the page that shows each (repository path -> page under docs/).
SITE_PAGES = {
    "README.md": "index.md",
    "RELIABILITY.md": "reliability.md",
    "BENCHMARKS.md": "benchmarks.md",
    "REPRODUCIBILITY.md": "reproducibility.md",
    "ARGUMENTS.md": "reference/arguments.md",
    "data/README.md": "datasets.md#folder-layouts",
}

_BLOCK = re.compile(r"(?<!`)<!--\s*(include|arguments)(?::\s*(.*?))?\s*-->.*?<!--\s*/\1\s*-->", re.DOTALL)
_INLINE = re.compile(r"(?<!`)<!--\s*(csv|flags):\s*(.*?)\s*-->")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s]+)\)")
_HTML_TAGS = {"a", "b", "br", "code", "details", "div", "em", "i", "img", "kbd", "p", "pre", "span", "strong",
              "sub", "summary", "sup", "table", "td", "th", "tr"}
_LOOSE_TAG = re.compile(r"<(/?)([A-Za-z][\w.-]*)(?![\w.-]|:)")  # not an autolink <https://...>


# ------------------------------------------------------------------------------------------------ mkdocs hooks
def on_page_markdown(markdown: str, page, config, files) -> str:
    page_path = page.file.src_uri  # e.g. "methods/ast.md"
    markdown = _BLOCK.sub(lambda m: _block(m.group(1), (m.group(2) or "").strip(), page_path), markdown)
    markdown = _INLINE.sub(lambda m: _inline(m.group(1), m.group(2).strip(), page_path), markdown)
    return _escape_loose_tags(markdown)


# ------------------------------------------------------------------------------------------------ markers
def _block(kind: str, argument: str, page_path: str) -> str:
    if kind == "arguments":
        text = arguments_markdown()
        lines = text.splitlines()
        if lines and lines[0].startswith("# "):  # the page has its own title
            lines = lines[1:]
        return "\n".join(lines).strip() + "\n"
    words = argument.split()
    if not words:
        raise PluginError(f"{page_path}: <!-- include: --> names no file")
    source, options = words[0], dict(w.split("=", 1) for w in words[1:] if "=" in w)
    path = REPO / source
    if not path.is_file():
        raise PluginError(f"{page_path}: <!-- include: {source} -->: no such file in the repository")
    text = path.read_text(encoding="utf-8")
    text = _rewrite_links(text, source, page_path)
    shift = int(options.get("shift", 0))
    if shift:
        text = _shift_headings(text, shift)
    return text.strip() + "\n"


def _inline(kind: str, argument: str, page_path: str) -> str:
    if kind == "csv":
        return csv_table(argument, page_path)
    groups = flag_groups()
    if argument not in groups:
        raise PluginError(f"{page_path}: <!-- flags: {argument} -->: no such flag group; the groups are: "
                          + "; ".join(groups))
    return groups[argument]


def csv_table(argument: str, page_path: str = "?") -> str:
    """A ``csv`` marker's argument (``docs/``-relative path, then options) as a Markdown table.

    Without options: every column, in the file's order. ``once=COL,...`` and ``bold=COL:VALUE,...``: see the
    module's docstring."""
    try:
        words = shlex.split(argument)
    except ValueError as exc:
        raise PluginError(f"{page_path}: <!-- csv: {argument} -->: {exc}") from None
    if not words:
        raise PluginError(f"{page_path}: <!-- csv: --> names no file")
    relative, options = words[0], {}
    for word in words[1:]:
        key, equals, value = word.partition("=")
        if key not in ("once", "bold") or not equals:
            raise PluginError(f"{page_path}: <!-- csv: {argument} -->: unknown option {word!r} (the options are "
                              "once=COLUMN,... and bold=COLUMN:VALUE,...)")
        options[key] = value
    path = DOCS / relative
    if not path.is_file():
        raise PluginError(f"{page_path}: <!-- csv: {relative} -->: no such file under docs/")
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    rows = [row for row in rows if row]
    if len(rows) < 2:
        raise PluginError(f"{page_path}: <!-- csv: {relative} -->: the file holds no data rows")
    header, body = rows[0], rows[1:]
    short = [row for row in body if len(row) != len(header)]
    if short:
        raise PluginError(f"{page_path}: <!-- csv: {relative} -->: a row has {len(short[0])} fields, the header "
                          f"{len(header)}")

    def column(name: str) -> int:
        if name not in header:
            raise PluginError(f"{page_path}: <!-- csv: {argument} -->: no column {name!r} in {relative}; the "
                              "columns are: " + ", ".join(header))
        return header.index(name)

    def text(value: str, name: str) -> str:
        code = value.startswith(("python ", "torchrun ", "make ")) or (name == "command" and value != "unknown")
        return f"`{value}`" if code else value

    def cell(value: str, name: str) -> str:
        return text(value.replace("|", "\\|").replace("\n", " "), name)

    once = [column(name) for name in options.get("once", "").split(",") if name]
    once = [i for i in once if len({row[i] for row in body}) == 1]
    bold: set[tuple[int, str]] = set()
    if "bold" in options:
        name, _, values = options["bold"].rpartition(":")
        index = column(name)
        for value in values.split(","):
            if not any(row[index] == value for row in body):
                raise PluginError(f"{page_path}: <!-- csv: {argument} -->: no cell of column {name!r} holds "
                                  f"{value!r} in {relative}")
            bold.add((index, value))
    shown = [i for i in range(len(header)) if i not in once]

    def shown_cell(row: list[str], i: int) -> str:
        value = cell(row[i], header[i])
        return f"**{value}**" if (i, row[i]) in bold else value

    lines = ["| " + " | ".join(header[i] for i in shown) + " |", "| " + " | ".join("---" for _ in shown) + " |"]
    lines += ["| " + " | ".join(shown_cell(row, i) for i in shown) + " |" for row in body]
    common = " · ".join(f"{header[i]}: {text(body[0][i].replace(chr(10), ' '), header[i])}" for i in once)
    return ("\n".join(lines) + "\n\n" + (common + "\n\n" if common else "")
            + f"Data: [`docs/{relative}`]({_relative(page_path, relative)}).\n")


# ------------------------------------------------------------------------------------------------ the flag reference
@lru_cache(maxsize=1)
def arguments_markdown() -> str:
    """What ``python -m mtil.arguments_doc`` prints (the same function, imported once per build)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from mtil.arguments_doc import arguments_markdown as generate

    return generate()


def flag_groups() -> dict[str, str]:
    """Flag group title -> its description and table, from the generated reference."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in arguments_markdown().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            groups[current] = []
        elif current is not None:
            groups[current].append(line)
    return {title: "\n".join(lines).strip() + "\n" for title, lines in groups.items()}


# ------------------------------------------------------------------------------------------------ helpers
def _relative(page_path: str, target: str) -> str:
    """``target`` (a path under docs/, maybe with #anchor) as a link from the page ``page_path``."""
    path, _, anchor = target.partition("#")
    link = posixpath.relpath(path, posixpath.dirname(page_path) or ".") if path else ""
    return link + (f"#{anchor}" if anchor else "")


def _rewrite_links(text: str, source: str, page_path: str) -> str:
    """Relative links of the file ``source`` (repository path), rewritten for the page ``page_path``."""
    base = posixpath.dirname(source)

    def replace(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)  # a URL, or an anchor of the same page
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(base, path))
        suffix = f"#{anchor}" if anchor else ""
        if repo_path.startswith("docs/"):
            return f"[{label}]({_relative(page_path, repo_path[len('docs/'):] + suffix)})"
        if repo_path in SITE_PAGES:
            page = SITE_PAGES[repo_path]
            if "#" in page and not suffix:
                page, _, page_anchor = page.partition("#")
                suffix = f"#{page_anchor}"
            return f"[{label}]({_relative(page_path, page.partition('#')[0] + suffix)})"
        plain = label.strip("`")
        return f"`{repo_path}`" if plain == repo_path or plain == path else f"{label} (`{repo_path}`)"

    return _outside_fences(text, lambda chunk: _LINK.sub(replace, chunk))


def _shift_headings(text: str, shift: int) -> str:
    def shifted(chunk: str) -> str:
        return re.sub(r"(?m)^(#{1,6}) ", lambda m: "#" * min(6, len(m.group(1)) + shift) + " ", chunk)

    return _outside_fences(text, shifted)


_CODE_SPAN = re.compile(r"(`+)(?!`)[\s\S]*?(?<!`)\1(?!`)")  # inline code, also across a line break


def _escape_loose_tags(markdown: str) -> str:
    def escape(text: str) -> str:
        pieces, last = [], 0
        for span in _CODE_SPAN.finditer(text):  # code spans stay as they are
            pieces += [_escape_tags(text[last:span.start()]), span.group(0)]
            last = span.end()
        return "".join(pieces + [_escape_tags(text[last:])])

    return _outside_fences(markdown, escape)


def _escape_tags(text: str) -> str:
    return _LOOSE_TAG.sub(lambda m: m.group(0) if m.group(2).lower() in _HTML_TAGS
                          else "&lt;" + m.group(1) + m.group(2), text)


def _outside_fences(text: str, function) -> str:
    """Apply ``function`` to the text outside fenced code blocks (and outside HTML comments)."""
    segments: list[tuple[bool, list[str]]] = [(False, [])]
    fenced = False
    for line in text.split("\n"):
        if _FENCE.match(line) and not fenced:
            fenced = True
            segments.append((True, [line]))
        elif _FENCE.match(line) and fenced:
            segments[-1][1].append(line)
            fenced = False
            segments.append((False, []))
        else:
            segments[-1][1].append(line)
    return "\n".join("\n".join(lines) if code else _outside_comments("\n".join(lines), function)
                     for code, lines in segments if lines)


def _outside_comments(text: str, function) -> str:
    pieces = re.split(r"(<!--.*?-->)", text, flags=re.DOTALL)
    return "".join(p if p.startswith("<!--") else function(p) for p in pieces)
