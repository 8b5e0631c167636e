"""Package dependencies are one-way: a module imports its own layer or a layer to its left, never one to its right.

Layers, left to right: leaves (no mtil imports besides other leaves) -> datasets, models -> evaluation, adapters,
records -> engine -> methods, registry -> the command-line modules. Every import counts: module level, inside
functions, under ``if TYPE_CHECKING``, ``import x`` and ``from x import y`` (``from mtil import registry`` is an
import of ``mtil.registry``). The source is read with :mod:`ast`, nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtil"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("mtil", "mtil.errors", "mtil.atomic", "mtil.flags", "mtil.yaml_files", "mtil.templates",
                "mtil.seeding", "mtil.hardware", "mtil.distributed", "mtil.parallel", "mtil.folder_lock",
                "mtil.archive_check", "mtil.tensor_files", "mtil.finite", "mtil.cli_spec",
                "mtil.seed_flags")),
    ("datasets and models", ("mtil.datasets", "mtil.models")),
    ("evaluation, adapters and records", ("mtil.evaluation", "mtil.adapters", "mtil.records")),
    ("engine", ("mtil.engine",)),
    ("methods", ("mtil.methods", "mtil.registry")),
    ("command line", ("mtil.args", "mtil.arguments_doc", "mtil.jobs", "mtil.sweep", "mtil.main", "mtil.demo",
                      "mtil.imo", "mtil.benchmark_checks", "mtil.data", "mtil.launch")),
]


def layer_of(module: str) -> int | None:
    """Index in LAYERS of ``module`` (the most specific entry naming it or a package above it; ``mtil`` itself
    names only the package's ``__init__``), None when no entry does."""
    best, depth = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name != "mtil" and module.startswith(name + "."))
            if covers and name.count(".") > depth:
                best, depth = index, name.count(".")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    """Whether ``name`` (``mtil.x.y``) is a module or package in the tree under ``root`` (the mtil folder)."""
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    base = root / relative
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, mtil module) of every import in the file, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..engine import y
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if _is_module(candidate, root) else base))
    mtil = [(line, name) for line, name in found if name == "mtil" or name.startswith("mtil.")]
    return list(dict.fromkeys(mtil))  # `from x import a, b` of one module: once


def source_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def violations(root: Path) -> list[str]:
    """``file:line imports module (layer -> layer to its right)`` for every backward import under ``root``."""
    found = []
    for path in source_files(root):
        here = module_name(path, root)
        mine = layer_of(here)
        for line, imported in imports_of(path, root):
            theirs = layer_of(imported)
            if mine is not None and theirs is not None and theirs > mine:
                found.append(f"{path.relative_to(root.parent)}:{line} imports {imported} "
                             f"({LAYERS[mine][0]} -> {LAYERS[theirs][0]})")
    return found


def edges(root: Path, source: str, target: str) -> list[str]:
    """``file:line imports module`` for the imports of modules under ``source`` from modules under ``target``."""
    def under(module: str, name: str) -> bool:
        return module == name or module.startswith(name + ".")

    return [f"{path.relative_to(root.parent)}:{line} imports {imported}"
            for path in source_files(root) if under(module_name(path, root), source)
            for line, imported in imports_of(path, root) if under(imported, target)]


# ------------------------------------------------------------------------------------------------ the package
def test_every_module_has_a_layer():
    unplaced = [module_name(p, PACKAGE) for p in source_files(PACKAGE) if layer_of(module_name(p, PACKAGE)) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS in tests/test_layers.py): {unplaced}"


def test_every_import_points_left():
    found = violations(PACKAGE)
    assert not found, "imports from a layer to one on its right:\n  " + "\n  ".join(found)


@pytest.mark.parametrize("source, target, why", [
    ("mtil.args", "mtil.sweep", "ARGUMENTS.md, which reads both parsers, is written by mtil.arguments_doc"),
    ("mtil.evaluation", "mtil.engine", "several-process helpers are in mtil.parallel"),
    ("mtil.engine", "mtil.args", "per-task validators are mtil.engine.run.TASK_SETTING_TYPES; roles come from "
                                 "the caller or the namespace's _roles"),
    ("mtil.methods", "mtil.args", "flag primitives are in mtil.flags"),
])
def test_named_backward_edges_are_gone(source, target, why):
    found = edges(PACKAGE, source, target)
    assert not found, f"{source} must not import {target} ({why}):\n  " + "\n  ".join(found)


def test_flags_is_a_leaf():
    imported = {name for _, name in imports_of(PACKAGE / "flags.py", PACKAGE)}
    assert imported <= {"mtil.errors"}, f"mtil/flags.py may import only the standard library and mtil.errors: " \
                                        f"{sorted(imported)}"


# ------------------------------------------------------------------------------------------------ the checker
def _tree(root: Path, files: dict[str, str]) -> Path:
    package = root / "mtil"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_checker_finds_backward_imports_wherever_they_stand(tmp_path):
    package = _tree(tmp_path, {
        "engine/__init__.py": "", "engine/run.py": "", "args.py": "", "registry.py": "",
        "evaluation/__init__.py": "",
        "evaluation/late.py": "import os\n\ndef f():\n    from mtil.engine import run\n",  # function level, from-import
        "evaluation/plain.py": "import mtil.args\n",  # import x
        "engine/early.py": "from mtil import registry, __version__\n",  # a submodule through its package
        "engine/rel.py": "from ..args import x\n",  # relative
        "engine/fine.py": "from mtil.errors import UserError\nfrom mtil.engine.run import Run\nimport mtil\n",
    })
    found = violations(package)
    assert found == [
        "mtil/engine/early.py:1 imports mtil.registry (engine -> methods)",
        "mtil/engine/rel.py:1 imports mtil.args (engine -> command line)",
        "mtil/evaluation/late.py:4 imports mtil.engine.run (evaluation, adapters and records -> engine)",
        "mtil/evaluation/plain.py:1 imports mtil.args (evaluation, adapters and records -> command line)",
    ]
    assert edges(package, "mtil.evaluation", "mtil.engine") == ["mtil/evaluation/late.py:4 imports mtil.engine.run"]


def test_layer_of_prefers_the_most_specific_entry():
    assert layer_of("mtil") == 0 and layer_of("mtil.flags") == 0
    assert layer_of("mtil.engine.loop") == 3 and layer_of("mtil.sweep.cli") == 5
    assert layer_of("mtil.somewhere_new") is None  # "mtil" covers only the package's __init__
