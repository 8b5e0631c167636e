"""Fuzz targets of mtil's input layers: Hypothesis strategies and the harnesses that feed them to mtil.

Shared by ``tests/test_fuzz.py`` (a short, derandomized run in the test suite) and ``scripts/fuzz.py`` (thousands
of cases per target). A target takes one generated case, gives it to mtil the way the command line or a resumed
run does, and returns

- ``"error"``: a clean refusal: exit code 2 with one ``mtil: error: ...`` line on stderr, the project's
  ``UserError``, or (for the derived metric files) a damaged file rebuilt from ``results.jsonl`` with a warning;
- ``"valid"``: the input was accepted.

Anything else propagates: an uncaught exception (KeyError, ValueError, OverflowError, RecursionError, a torch
RuntimeError ...), another exit code, or an error message that is not one line (:class:`BadExit`). That is a crash.

Nothing here trains, downloads or writes outside the case's temporary folder. The command line runs up to the
last check before anything is written: with random flags, every check that needs no model (``parse_args`` and its
validation, the device, the components, the task list and per-task settings: ``SequenceRunner`` up to
``check_settings``); with a damaged checkpoint, ``SequenceRunner.prepare`` (every check; it reads files and writes
none) or, for ``--eval-only``, the evaluation job up to its first forward pass. Models are built only from
checkpoints whose architecture is small (:func:`fuzz_environment` refuses others as a crash, instead of letting a
damaged file allocate gigabytes); the heat map of ``--summarize`` is checked but not rendered (that is slow).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import yaml
from hypothesis import strategies as st

ERROR, VALID = "error", "valid"
CASE_DIR = "{dir}"  # in a case's argv: the case's temporary folder


class BadExit(AssertionError):
    """mtil ended without a traceback but not cleanly: another exit code, or an error that is not one line."""


class ReachedWork(Exception):
    """The job got past its last check (to its first forward pass): the input was accepted."""


class HugeModel(Exception):
    """A file would make mtil build a model far larger than any CLIP (a damaged architecture record)."""


# ---------------------------------------------------------------------------------------------- values
NUMBERS = ["0", "-0", "1", "-1", "2", "7", "2147483647", "2147483648", "4294967295", "4294967296", str(2**63),
           str(-2**63 - 1), "1" * 40, "9" * 5000, "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e309",
           "1e-400", "0.5", "1.0", "0.999", "1e-5", "3e-4", " 3 ", "3\n", "\t-1\n", " 0.5\n", "1_000", "0x10",
           "1e3", "\u0663", "+2", ".5", "5.", "", " "]
NO_USER = "~mtil_fuzz_no_such_user"
PATHS = ["", ".", "..", "/", "/dev/null", "/proc/self/mem", "~", "~/x", NO_USER, f"{NO_USER}/run", "no/such/file.yaml",
         "a\nb", " ", "-", "--", f"ImageFolder:{NO_USER}/x", "ImageFolder:/tmp", CASE_DIR, f"{CASE_DIR}/missing"]
WORDS = ["{}", "{}{}", "{0}", "{", "}", "a photo of a {}.", "{!r}", "{:>10}", "{0.x}", "{[", "ToyShape", "ToyColor",
         "ToyShape,ToyColor", "ToyShape,ToyShape", "MTIL-I", "MTIL-II", "ToyWorld", "ToyCaptions", ",", " , ",
         "image=1,text=0.1", "head=2", "image=nan", "image=-1", "image=inf", "x=1", "image", "=", "image==1",
         "visual.*", "*", "[", "attn", "attn,mlp.c_fc", "cuda", "cuda:0", "cuda:-1", "cuda:x", "cpu:0", "cpu:-1",
         f"cpu:{'9' * 30}", "meta", "mps", "xla", "cpu", "auto", "random", "dataset:", "dataset:ToyShape", "ref",
         "conceptual_captions", "finetune", "ZSCL", "lwf", "icarl", "whole", "image", "fc", "sgd", "bf16"]
# Text that can be a command-line argument: no NUL, no lone surrogates.
ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
# Text that can be in a file (YAML escapes NUL and friends).
FILE_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
BIG_INTS = st.integers(-2**70, 2**70)
SCALARS = st.one_of(st.none(), st.booleans(), BIG_INTS, st.integers(-3, 10), FLOATS, FILE_TEXT,
                    st.sampled_from(NUMBERS + WORDS + PATHS))


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, drawn in proportion to its weight (``st.one_of`` drifts to the branches with the
    most distinct values, so a branch repeated in it gains little)."""
    branches = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(branches) - 1).flatmap(lambda i: branches[i])


@functools.lru_cache(maxsize=None)
def flag_actions() -> tuple:
    """The parser's flags (every spelling), help excluded: it prints and exits 0 by design."""
    from mtil.args import build_parser

    return tuple(a for a in build_parser()._actions if a.option_strings and a.dest != "help")


@functools.lru_cache(maxsize=None)
def flag_names() -> tuple[str, ...]:
    """Every flag name as a --config key (dest, hyphen and underscore spellings)."""
    names = set()
    for action in flag_actions():
        names.add(action.dest)
        names.update(o.lstrip("-") for o in action.option_strings)
    return tuple(sorted(names))


def arg_value(action) -> st.SearchStrategy[str]:
    """Any text, weighted towards what the flag takes (so that a case often gets past the flag's own check)."""
    from mtil.args import INTEGER_TYPES

    junk = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(PATHS), st.sampled_from(WORDS), ARG_TEXT,
                     BIG_INTS.map(str), FLOATS.map(repr))
    if action.choices:
        likely = st.sampled_from([str(c) for c in action.choices])
    elif action.type in INTEGER_TYPES:
        likely = st.integers(-1, 9).map(str) | st.sampled_from(NUMBERS)
    elif action.type is not None and action.type.__name__.endswith(("float", "interval", "unit", "smoothing",
                                                                    "dropout", "fraction")):
        likely = st.floats(-0.5, 1.5).map(repr) | st.sampled_from(NUMBERS)
    elif getattr(action, "is_path", False) or action.dest in ("model", "ref_model"):
        likely = st.sampled_from(PATHS + ["micro-vit", "toyclip"])
    else:
        likely = st.sampled_from(WORDS + PATHS)
    return weighted((2, likely), (1, junk))


FAST = ("--model", "micro-vit", "--device", "cpu", "--workers", "0")
BASES = [(), (*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "2"), ("--eval-only", *FAST),
         ("--train-dataset", "ToyShape", "--epochs", "1"), ("--method", "ZSCL", "--train-dataset", "ToyShape",
                                                             "--iterations", "2", "--ref-dataset", "ToyCaptions")]
ODD_TOKENS = ["--unknown", "-x", "--", "positional", "--lr=", "--no-lr", "--conf", "--no-", "-", "--no-we=1",
              "--we=yes", "--config", "--save", "--=", "---lr"]


@st.composite
def command_lines(draw) -> tuple[str, ...]:
    """A base command (or none) and up to six random flags of the real parser with random values."""
    argv = list(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4, 6]))):
        action = draw(st.sampled_from(flag_actions()))
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
            continue
        value = draw(arg_value(action))
        form = draw(st.sampled_from(["apart"] * 4 + ["joined"] * 3 + ["missing"]))
        if form == "apart":
            argv += [flag, value]
        elif form == "joined":
            argv.append(f"{flag}={value}")
        else:
            argv.append(flag)
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(ODD_TOKENS) | ARG_TEXT))
    return tuple(argv)


# ---------------------------------------------------------------------------------------------- files
@st.composite
def mutations(draw, base: bytes) -> bytes:
    """``base`` with a few random edits: bit flips, inserted, deleted or replaced bytes, a truncation."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "replace", "truncate", "duplicate"]))
        at = draw(st.integers(0, max(len(data), 1))) % max(len(data), 1)
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=8) | st.sampled_from([b"\n", b":", b"- ", b"{", b"[", b"\xff",
                                                                        b'"', b",", b"-1", b"1e999", b"nan"]))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "replace":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
        elif op == "truncate":
            del data[at:]
        elif op == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 40))]
    return bytes(data)


def yaml_values(keys: st.SearchStrategy = FILE_TEXT) -> st.SearchStrategy:
    return st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(keys | st.integers(-2, 2), inner, max_size=4), max_leaves=8)


def dump_yaml(document: Any, unicode: bool) -> bytes:
    return yaml.safe_dump(document, allow_unicode=unicode, default_flow_style=None, sort_keys=False).encode("utf-8")


def yaml_files(documents: st.SearchStrategy, valid: bytes, raw: list[str]) -> st.SearchStrategy[bytes]:
    """Dumped random documents, hand-written tricky YAML, random bytes, and mutations of a valid file."""
    return weighted((10, st.builds(dump_yaml, documents, st.booleans())),
                    (2, st.sampled_from([r.encode("utf-8", "surrogatepass") for r in raw])),
                    (2, st.binary(max_size=300)), (4, mutations(valid)),
                    (2, st.builds(bytes.__add__, st.just(valid), st.binary(max_size=40))))


TRICKY_YAML = [
    "", "---\n", "~\n", "- 1\n- 2\n", "just text\n", "42\n", "lr: 2020-13-45\n", "lr: 2001-02-30 10:00:00\n",
    "seed: 2001-12-14t21:59:43.10-05:00\n", "batch_size: " + "1" * 5000 + "\n", "[" * 3000 + "\n",
    "{a: " * 1500 + "\n", "!!python/object/apply:os.system ['true']\n", "lr: !!binary 'not base64!'\n",
    "lr: !!float abc\n", "lr: !!int 1.5\n", "? [a, b]\n: 1\n", "&a [*a]\n", "a: &x 1\nb: *y\n", "--- 1\n--- 2\n",
    "\tlr: 1\n", "\ufefflr: 1\n", "lr: 0x1F\n", "lr: 1_000\n", "lr: .inf\n", "lr: .nan\n", "seed: -0o17\n",
    "iterations: 1e400\n", "%YAML 9.9\n---\nlr: 1\n", "lr: 1\nlr: 2\n", "lr: [1, [2, [3]]]\n", "lr: {a: {b: 1}}\n",
    "save: \"a\\0b\"\n", f"save: {NO_USER}/run\n", "save: '~'\n", f"data_location: {NO_USER}\n",
    f"train_dataset: ImageFolder:{NO_USER}/x\n", "prompt: '{'\n", "prompt: \"a\\nb {}\"\n", "config: x.yaml\n",
    "help: true\n", "we: 1\n", "we: yes\n", "lr: true\n", "1: 2\n", "null: 1\n", "2001-01-01: 1\n",
    "eval_datasets: [ToyShape, [ToyColor]]\n", "lr_multipliers: {image: .nan}\n", "freeze: {a: 1}\n",
    "device: \"cpu\\u0000\"\n", "iterations: 1.5\n", "iterations: -0.0\n", "iterations: 4.0\nepochs: 2\n",
]
TRICKY_SEQUENCES = [
    "tasks:\n", "tasks: []\n", "tasks: {}\n", "tasks: ToyShape\n", "tasks:\n  - \n", "tasks:\n  - [ToyShape]\n",
    "tasks:\n  - {dataset: ToyShape, 1: 2, b: 3}\n", "tasks:\n  - {dataset: ToyShape, null: 2}\n",
    "tasks:\n  - {dataset: ToyShape, [a]: 1}\n", "tasks:\n  - {dataset: [A, B]}\n", "tasks:\n  - {dataset: null}\n",
    "tasks:\n  - {dataset: ToyShape, lr: 2020-13-45}\n", "tasks:\n  - {dataset: ToyShape, lr: 2020-01-01}\n",
    "tasks:\n  - {dataset: ToyShape, iterations: " + "9" * 5000 + "}\n", "tasks:\n  - {dataset: ToyShape, lr: 1e400}\n",
    "tasks:\n  - {dataset: ToyShape, iterations: 1e300}\n", "tasks:\n  - {dataset: ToyShape, lr: [1]}\n",
    "tasks:\n  - {dataset: ToyShape, batch_size: 1.5}\n", "tasks:\n  - {dataset: ToyShape, epochs: 2, iterations: 3}\n",
    "tasks:\n  - {dataset: ToyShape, lr: ' 1e-3 '}\n", "tasks:\n  - {dataset: ToyShape, lr: \"-1\\n\"}\n",
    "tasks: &a [*a]\n", "tasks:\n  - ToyShape\n  - ToyShape\n", "tasks:\n  - \"\"\n", "tasks:\n  - ','\n",
    f"tasks:\n  - ImageFolder:{NO_USER}/x\n", "tasks:\n  - {dataset: ToyShape, warmup_length: -1}\n",
    "tasks:\n  - {dataset: ToyShape, beta2: 1}\n", "tasks:\n  - {dataset: ToyShape, ls: .nan}\n",
] + TRICKY_YAML
VALID_CONFIG = (b"lr: 3.0e-4\nbatch-size: 16\nwe: true\navg_freq: 5\nfreeze: [visual.conv1.*, token_embedding.*]\n"
                b"train_dataset: ToyShape\niterations: 2\nmodel: micro-vit\ndevice: cpu\nworkers: 0\n")
VALID_SEQUENCE = (b"tasks:\n  - {dataset: ToyShape, lr: 5.0e-3, iterations: 3, batch_size: 8, wd: 0.1, ls: 0.1}\n"
                  b"  - ToyColor\n  - {dataset: ToyCaptions, epochs: 1, beta2: 0.99, warmup_length: 0}\n")


def yaml_value_for(action) -> st.SearchStrategy:
    """A YAML value for a flag's setting, weighted towards what the flag takes."""
    from mtil.args import INTEGER_TYPES, Switch

    if isinstance(action, Switch):
        likely = st.booleans()
    elif action.type in INTEGER_TYPES:
        likely = st.integers(-1, 9) | st.floats(0, 9).map(float.__round__).map(float)
    elif action.choices:
        likely = st.sampled_from(list(action.choices))
    elif action.type is not None and action.type.__name__ != "name_list" and action.type.__name__ != "lr_multipliers":
        likely = st.floats(-0.5, 1.5)
    else:
        likely = st.sampled_from(PATHS + WORDS) | st.lists(st.sampled_from(WORDS), max_size=3)
    return weighted((2, likely), (1, yaml_values()))


@st.composite
def config_settings(draw) -> dict:
    """``flag: value`` pairs of real flags (either spelling), each value likely of the flag's kind."""
    document = {}
    for _ in range(draw(st.integers(1, 5))):
        action = draw(st.sampled_from(flag_actions()))
        key = draw(st.sampled_from([action.dest] + [o.lstrip("-") for o in action.option_strings]))
        document[key] = draw(yaml_value_for(action))
    return document


def config_documents() -> st.SearchStrategy:
    keys = st.sampled_from(flag_names()) | FILE_TEXT
    return weighted((6, config_settings()), (2, st.dictionaries(keys, yaml_values(), max_size=6)), (1, yaml_values()))


TASK_VALUES = {"lr": st.floats(1e-6, 1), "iterations": st.integers(1, 5), "epochs": st.integers(1, 3),
               "batch_size": st.integers(1, 64), "wd": st.floats(0, 1), "beta2": st.floats(0, 0.999),
               "ls": st.floats(0, 0.5), "warmup_length": st.integers(0, 10)}


def sequence_documents() -> st.SearchStrategy:
    names = st.sampled_from(["ToyShape", "ToyColor", "ToyCaptions", "MTIL-I", "", f"ImageFolder:{NO_USER}/x"])
    settings = st.fixed_dictionaries({}, optional={k: weighted((3, v), (1, SCALARS)) for k, v in TASK_VALUES.items()})
    task = st.builds(lambda name, rest: {"dataset": name, **rest}, names | FILE_TEXT, settings)
    junk = st.dictionaries(st.sampled_from([*TASK_VALUES, "dataset"]) | FILE_TEXT, yaml_values(), max_size=4)
    entry = weighted((2, names), (5, task), (1, junk))
    tasks = st.lists(entry, min_size=1, max_size=4).map(lambda t: {"tasks": t})
    return weighted((6, tasks), (1, st.dictionaries(st.just("tasks") | FILE_TEXT, yaml_values(), max_size=3)),
                    (1, yaml_values()))


# ---------------------------------------------------------------------------------------------- metric files
DATASETS = ["A", "B", "C", "ImageFolder:/x/y", "", "a,b", "A\nB"]
RESULT_KEYS = ["dataset", "iteration", "after_task", "sequence", "top1", "top5", "method", "time", "config", "images"]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), BIG_INTS, st.integers(-2, 4), FLOATS, FILE_TEXT,
                         st.sampled_from(DATASETS), st.sampled_from([10**30, -1, 2**63, 1e308, 0.5, "1", "x"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(FILE_TEXT, inner, max_size=3), max_leaves=6)


@st.composite
def result_records(draw) -> dict:
    """A results.jsonl record: mostly the fields mtil writes, each sometimes with a wrong value or type."""
    record = {"dataset": draw(st.sampled_from(DATASETS[:3])), "iteration": draw(st.integers(0, 8)),
              "after_task": draw(st.none() | st.integers(0, 3)),
              "sequence": draw(st.lists(st.sampled_from(DATASETS[:3]), max_size=3, unique=True)),
              "top1": draw(st.floats(0, 100)), "top5": draw(st.floats(0, 100)), "method": "finetune"}
    for key in draw(st.lists(st.sampled_from(RESULT_KEYS), max_size=3)):
        if draw(st.booleans()):
            record[key] = draw(JSON_VALUES)
        else:
            record.pop(key, None)
    return record


def _jsonl(records: list, torn: bool) -> bytes:
    text = "".join(json.dumps(r) + "\n" for r in records)
    return (text[:-7] if torn and len(text) > 7 else text).encode("utf-8")


TRICKY_JSONL = [b"[" * 100000 + b"\n", b"{\"after_task\": " + b"1" * 5000 + b"}\n", b"1" * 5000 + b"\n",
                b'{"after_task": Infinity, "dataset": "A", "top1": 1}\n', b'{"after_task": 1e400, "dataset": "A"}\n',
                b'{"after_task": NaN, "dataset": "A"}\n', b'{"after_task": -1, "dataset": "A", "top1": 5}\n',
                b'{"after_task": 99999999999999999999999, "dataset": "A", "top1": 5, "sequence": ["A"]}\n',
                b'{"after_task": 5, "dataset": "A", "top1": 5, "sequence": ["A"]}\n',
                b'{"after_task": 1, "dataset": "A", "top1": 5, "sequence": ["A", "A"]}\n',
                b'{"after_task": 1, "dataset": "A", "top1": [5], "sequence": ["A"]}\n',
                b'{"after_task": 1, "dataset": "A", "top1": {"x": 1}, "sequence": ["A"]}\n',
                b'{"after_task": 1, "dataset": "A", "top1": "1e999", "sequence": ["A"]}\n',
                b'{"after_task": 1, "dataset": "A", "iteration": 1e400, "top1": 5, "top5": 9, "sequence": ["A"]}\n',
                b'{"after_task": true, "dataset": "A", "top1": 5, "sequence": ["A"]}\n',
                b'{"after_task": 1, "dataset": "A", "top1": 5, "sequence": "AB"}\n',
                b'{"after_task": 1, "dataset": "A", "top1": 5, "sequence": {"A": 1}}\n', b"\xff\xfe\x00\n",
                b'{"after_task": "1", "dataset": null, "top1": null, "sequence": [null]}\n']


def results_files(valid: bytes) -> st.SearchStrategy[bytes]:
    records = st.builds(_jsonl, st.lists(result_records() | JSON_VALUES, max_size=8), st.booleans())
    return weighted((8, records), (2, st.sampled_from(TRICKY_JSONL)), (1, st.binary(max_size=300)),
                    (3, mutations(valid)), (1, st.builds(bytes.__add__, st.sampled_from(TRICKY_JSONL), st.just(valid))))


def csv_files(valid: bytes, columns: list[str]) -> st.SearchStrategy[bytes]:
    cells = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(DATASETS), FILE_TEXT, BIG_INTS.map(str),
                      FLOATS.map(repr))
    header = st.lists(st.sampled_from(columns) | FILE_TEXT, max_size=5).map(",".join) | st.just(",".join(columns))
    rows = st.lists(st.lists(cells, max_size=5).map(",".join), max_size=6)
    table = st.builds(lambda h, r: ("\n".join([h, *r]) + "\n").encode("utf-8", "surrogatepass"), header, rows)
    tricky = st.sampled_from([b"", b'"' * 3 + b"\n" + b"x" * 200000, b"\x00" * 50, valid + b"\xff\n"])
    return weighted((6, table), (1, st.binary(max_size=300)), (4, mutations(valid)), (1, tricky))


@functools.lru_cache(maxsize=None)
def valid_metric_files() -> dict[str, bytes]:
    """Files written by mtil's own writers for a two-task run (A then B): results.jsonl, a metrics file, the
    accuracy matrix."""
    import pandas as pd

    from mtil.evaluation import matrix as mx
    from mtil.evaluation.metrics_io import append_result_line, write_metric_row

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = []
        for after_task, (iteration, sequence) in enumerate([(0, []), (4, ["A"]), (8, ["A", "B"])]):
            for dataset in ("A", "B"):
                top1 = 10.0 + 20 * after_task + (dataset == "B")
                append_result_line(folder, {"dataset": dataset, "iteration": iteration, "after_task": after_task,
                                            "sequence": sequence, "top1": top1, "top5": top1 + 5, "images": 16,
                                            "method": "finetune"}, {"lr": 1e-5, "method": "finetune"})
                write_metric_row(folder, dataset, iteration, top1, top1 + 5)
                rows.append({"after_task": after_task, "dataset": dataset, "top1": top1, "top5": top1 + 5})
        mx.write_matrix(folder / "accuracy_matrix.csv", pd.DataFrame(rows), ["A", "B"])
        return {p.name: p.read_bytes() for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------- checkpoints
TINY_ARCH = dict(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
                 context_length=8, vocab_size=64, transformer_width=64, transformer_heads=1, transformer_layers=1)
RESUME_ARGV = ("--model", "micro-vit", "--device", "cpu", "--workers", "0", "--train-dataset", "ToyShape",
               "--iterations", "2", "--save", f"{CASE_DIR}/run")
LOAD_ARGVS = {
    "train": ("--device", "cpu", "--workers", "0", "--train-dataset", "ToyShape", "--iterations", "2", "--load",
              f"{CASE_DIR}/weights.pth"),
    "eval": ("--eval-only", "--device", "cpu", "--workers", "0", "--eval-datasets", "ToyShape", "--load",
             f"{CASE_DIR}/weights.pth"),
}


@functools.lru_cache(maxsize=None)
def base_checkpoint() -> bytes:
    """A mid-task checkpoint of RESUME_ARGV's run, built and written the way mtil does (every entry a real one:
    model, optimiser and scheduler states after a step, RNG states, training state, configuration record), of a
    tiny CLIP (vocabulary 64) so that a damaged copy is quick to write and read."""
    import torch

    from mtil import registry
    from mtil.args import parse_args, path_flags
    from mtil.engine.checkpoint import capture_rng, save_checkpoint
    from mtil.engine.schedule import warmup_cosine
    from mtil.engine.resume import base_spec
    from mtil.engine.sequence import SequenceRunner
    from mtil.engine.state import TrainingState
    from mtil.models.architectures import Architecture
    from mtil.models.clip_loading import build_clip

    with tempfile.TemporaryDirectory() as tmp:
        args = parse_args([a.replace(CASE_DIR, tmp) for a in RESUME_ARGV])
        components = registry.build_components(args)
        runner = SequenceRunner(args, components, path_flags())
        arch = Architecture(**TINY_ARCH)
        model = build_clip(arch, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = warmup_cosine(optimizer, 1, 2)
        sum(p.float().pow(2).sum() for p in model.parameters()).backward()
        optimizer.step()
        scheduler.step()
        state = TrainingState(sequence=["ToyShape"], step=1, total_steps=2, global_step=1, zero_shot_evaluated=True,
                              base=base_spec(args, path_flags()))
        payload = {"arch": arch.to_dict(), "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                   "heads": {}, "methods": {c.name: c.state_dict() for c in components}, "rng": capture_rng(),
                   "state": state.to_dict(), "iteration": 1, "config": runner.config_record,
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        path = save_checkpoint(Path(tmp) / "latest.pth", payload)
        return path.read_bytes()


@functools.lru_cache(maxsize=None)
def base_payload() -> dict:
    import torch

    from mtil.tensor_files import CHECKSUM_KEY

    payload = torch.load(io.BytesIO(base_checkpoint()), map_location="cpu", weights_only=True)
    payload.pop(CHECKSUM_KEY)  # a structure edit re-saves the dict: its checks are the structure's, not the sums'
    return payload


@functools.lru_cache(maxsize=None)
def payload_paths() -> tuple[tuple, ...]:
    """Entries of the checkpoint dict (to depth 2; a few of each large mapping) that a structural damage edits."""
    paths = []
    for key, value in base_payload().items():
        paths.append((key,))
        if isinstance(value, dict):
            inner = list(value)
            if key in ("model", "config"):
                inner = inner[:4] + inner[-2:]
            paths += [(key, k) for k in inner]
    return tuple(paths)


@dataclass(frozen=True)
class Damage:
    """How a copy of :func:`base_checkpoint` is damaged: ``bytes`` edits of the file, or ``structure`` edits of
    its dict re-saved with torch.save (an entry deleted or given another value)."""

    kind: str  # "none" (an intact copy), "zero", "zeroed", "truncate", "bytes", "storage", "random", "structure"
    edits: tuple = ()
    source: str = "checkpoint"  # which file of mtil's is damaged (TENSOR_FILES); structure edits: checkpoints only

    def materialize(self) -> bytes:
        base = TENSOR_FILES[self.source][0]()
        if self.kind == "none":
            return base
        if self.kind == "zero":
            return b""
        if self.kind == "zeroed":  # the size kept, every byte 0 (a file system that lost the blocks)
            return bytes(len(base))
        if self.kind == "storage":  # bytes changed in place inside a tensor's record: the zip stays valid
            return _overwrite_storage(base, *self.edits)
        if self.kind == "truncate":
            return base[:self.edits[0] % len(base)]
        if self.kind == "random":
            return self.edits[0]
        if self.kind == "bytes":
            data = bytearray(base)
            for op, at, value in self.edits:
                at %= len(data)
                if op == "flip":
                    data[at] ^= 1 << (value % 8)
                elif op == "write":
                    data[at:at + len(value)] = value
                elif op == "append":
                    data += value
            return bytes(data)
        import copy

        import torch

        payload = copy.copy(base_payload())
        for op, path, value in self.edits:
            holder = payload
            for key in path[:-1]:
                child = holder.get(key) if isinstance(holder, dict) else None
                if not isinstance(child, dict):
                    break
                holder[key] = child = dict(child)
                holder = child
            else:
                if op == "delete":
                    holder.pop(path[-1], None)
                else:
                    holder[path[-1]] = _weights_only_value(value)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()


def _overwrite_storage(base: bytes, which: int, at: int, noise: bytes) -> bytes:
    """``base`` with the bytes at ``at`` of its ``which``-th tensor record each changed by ``noise`` (non-zero)."""
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(base)) as archive:
        infos = [i for i in archive.infolist() if i.file_size and i.filename.split("/")[-2:-1] == ["data"]]
    info = infos[which % len(infos)]
    name_length, extra_length = struct.unpack_from("<HH", base, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    data = bytearray(base)
    for offset, delta in enumerate(noise):
        position = start + (at + offset) % info.file_size
        data[position] = (data[position] + (delta or 1)) % 256
    return bytes(data)


def _weights_only_value(value):
    """A value ``torch.load(weights_only=True)`` can read back: tensors are described as ('tensor', kind)."""
    import torch

    if isinstance(value, tuple) and value[:1] == ("tensor",):
        return {"empty": torch.zeros(0), "scalar": torch.tensor(3.0), "int": torch.arange(4),
                "nan": torch.full((2, 2), float("nan")), "big": torch.zeros(3, 70)}[value[1]]
    return value


TRICKY_DAMAGES = [
    Damage("structure", (("set", ("heads",), {"ToyShape": "x"}),)),
    Damage("structure", (("set", ("heads",), {"ToyShape": {"kind": "linear", "tensors": {}}}),)),
    Damage("structure", (("set", ("heads",), {"ToyShape": {"kind": "linear", "tensors": {"linear.weight": 1}}}),)),
    Damage("structure", (("set", ("heads",), {"ToyShape": {"linear.weight": ("tensor", "big")}}),)),
    Damage("structure", (("set", ("heads",), [1, 2]),)),
    Damage("structure", (("set", ("state", "completed"), 5),)),
    Damage("structure", (("set", ("state", "completed"), ["ToyShape"]), ("set", ("state", "step"), "x"))),
    Damage("structure", (("set", ("state", "base"), {"model": 1}),)),
    Damage("structure", (("set", ("config", "method"), ["finetune"]),)),
    Damage("structure", (("set", ("config", "lr"), ("tensor", "big")),)),
    Damage("structure", (("set", ("iteration",), "7"),)),
    Damage("structure", (("set", ("iteration",), 1e400),)),
    Damage("structure", (("set", ("arch", "vocab_size"), 1 << 40),)),
    Damage("structure", (("set", ("arch", "vision_width"), 1 << 20),)),
    Damage("structure", (("delete", ("arch",), None), ("set", ("model", "visual.conv1.weight"), ("tensor", "empty")))),
    Damage("structure", (("delete", ("arch",), None), ("set", ("model", "visual.conv1.weight"), ("tensor", "big")))),
    Damage("structure", (("set", ("format",), "other"),)),
    Damage("structure", (("set", ("rng",), None), ("set", ("scheduler",), 3))),
]


def byte_damages(source: str) -> st.SearchStrategy[Damage]:
    """Damage to the bytes of one of mtil's tensor files: cut short, zeroed, bits and bytes changed anywhere, or
    bytes changed in place inside a tensor's record (what torch.load alone reads without complaint)."""
    positions = st.integers(0, 2**31)
    byte_edit = st.one_of(st.tuples(st.just("flip"), positions, st.integers(0, 7)),
                          st.tuples(st.just("write"), positions, st.binary(min_size=1, max_size=16)),
                          st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=64)))
    return weighted(
        (1, st.builds(Damage, st.sampled_from(["zero", "zeroed", "none"]), st.just(()), st.just(source))),
        (2, st.builds(Damage, st.just("truncate"), st.tuples(positions), st.just(source))),
        (3, st.builds(Damage, st.just("bytes"), st.lists(byte_edit, min_size=1, max_size=8).map(tuple),
                      st.just(source))),
        (4, st.builds(Damage, st.just("storage"), st.tuples(st.integers(0, 1000), positions,
                                                            st.binary(min_size=1, max_size=64)), st.just(source))),
    )


def damages() -> st.SearchStrategy[Damage]:
    positions = st.integers(0, 2**31)
    values = st.one_of(SCALARS, st.lists(st.integers(-2, 100), max_size=4), st.dictionaries(FILE_TEXT, SCALARS,
                                                                                             max_size=3),
                       st.sampled_from(["empty", "scalar", "int", "nan", "big"]).map(lambda k: ("tensor", k)),
                       st.sampled_from([0, -1, 3, 1 << 20, 1 << 40, "ToyShape", "mtil-checkpoint", [], {}]))
    byte_edit = st.one_of(st.tuples(st.just("flip"), positions, st.integers(0, 7)),
                          st.tuples(st.just("write"), positions, st.binary(min_size=1, max_size=16)),
                          st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=64)))
    structure_edit = st.tuples(st.sampled_from(["delete", "set", "set"]), st.sampled_from(payload_paths()), values)
    return weighted(
        (2, st.sampled_from(TRICKY_DAMAGES)),
        (1, st.sampled_from([Damage("zero"), Damage("none")])),
        (2, st.builds(Damage, st.just("truncate"), st.tuples(positions))),
        (2, st.builds(Damage, st.just("storage"), st.tuples(st.integers(0, 1000), positions,
                                                            st.binary(min_size=1, max_size=64)))),
        (1, st.just(Damage("zeroed"))),
        (4, st.builds(Damage, st.just("bytes"), st.lists(byte_edit, min_size=1, max_size=8).map(tuple))),
        (1, st.builds(Damage, st.just("random"), st.tuples(st.binary(max_size=200)
                                                           | st.just(b"PK\x03\x04" + b"\x00" * 100)))),
        (5, st.builds(Damage, st.just("structure"), st.lists(structure_edit, min_size=1, max_size=4).map(tuple))),
    )


# ---------------------------------------------------------------------------------------------- tensor files
FEATURES_DESCRIPTOR = {"dataset": "ToyShape", "split": "test", "kind": "fuzz"}


@functools.lru_cache(maxsize=None)
def _micro_model():
    from mtil.models.clip_loading import load_clip

    return load_clip("micro-vit", seed=0).model


def _written(write: Callable[[Path], Path]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return write(Path(tmp)).read_bytes()


@functools.lru_cache(maxsize=None)
def base_feature_entry() -> bytes:
    import torch

    from mtil.adapters.feature_cache import FeatureStore

    def write(folder: Path) -> Path:
        store = FeatureStore(folder)
        generator = torch.Generator().manual_seed(0)
        store.save(_micro_model(), 0, FEATURES_DESCRIPTOR, torch.randn(40, 64, generator=generator),
                   torch.arange(40) % 4)
        return store.path(_micro_model(), 0, FEATURES_DESCRIPTOR)

    return _written(write)


@functools.lru_cache(maxsize=None)
def feature_entry_name() -> str:
    """Where a FeatureStore rooted at ``fc`` looks for the entry of :data:`FEATURES_DESCRIPTOR`."""
    from mtil.adapters.feature_cache import FeatureStore

    store = FeatureStore("fc")
    return str(store.path(_micro_model(), 0, FEATURES_DESCRIPTOR))


@functools.lru_cache(maxsize=None)
def base_imo_adapter() -> bytes:
    import copy

    import torch

    from mtil.models.imo_adapter import add_imo_adapters, imo_adapters, save_imo_adapters

    model = copy.deepcopy(_micro_model())
    add_imo_adapters(model)
    with torch.no_grad():
        for parameter in imo_adapters(model).parameters():
            parameter.normal_(generator=torch.Generator().manual_seed(parameter.numel()))
    return _written(lambda folder: save_imo_adapters(model, folder / "imo.pt"))


@functools.lru_cache(maxsize=None)
def base_ogd_basis() -> bytes:
    import torch

    from mtil.methods.ogd import save_basis

    rows = torch.linalg.qr(torch.randn(300, 3, generator=torch.Generator().manual_seed(0)))[0].T.contiguous()
    return _written(lambda folder: save_basis(folder / "grad_ToyShape.pth", {"visual.proj": rows}, ["ToyShape"],
                                              0.97))


def _intact(source: str):
    from mtil.tensor_files import load_tensors

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(TENSOR_FILES[source][0]())
        return load_tensors(path)


def _same_tensors(read: Any, written: Any, what: str) -> None:
    """Raise when a file accepted as intact gave other tensors than were written: damage used silently."""
    from mtil.tensor_files import payload_tensors

    import torch

    got, want = list(payload_tensors(read)), list(payload_tensors(written))
    if [n for n, _ in got] != [n for n, _ in want] or not all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for (_, a), (_, b) in zip(got, want)):
        raise AssertionError(f"a damaged {what} was read as intact and its tensors were used")


def _read_checkpoint(folder: Path) -> str:
    from mtil.engine.checkpoint import load_resumable
    from mtil.errors import UserError

    try:
        payload = load_resumable(folder / "latest.pth")
    except UserError:
        return ERROR
    _same_tensors(payload["model"], base_payload()["model"], "checkpoint")
    return VALID


def _read_feature_entry(folder: Path) -> str:
    from mtil.adapters.feature_cache import FeatureStore

    store = FeatureStore(folder / "fc")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        found = store.load(_micro_model(), 0, FEATURES_DESCRIPTOR)
    if found is None:
        assert store.damaged == 1 and "cannot be used" in err.getvalue(), err.getvalue()
        return ERROR
    written = _intact("feature-cache")
    _same_tensors(list(found), [written["features"], written["labels"]], "feature-cache entry")
    return VALID


def _read_imo_adapter(folder: Path) -> str:
    from mtil.errors import UserError
    from mtil.models.imo_adapter import read_imo_file

    try:
        tensors, _ = read_imo_file(folder / "imo.pt")
    except UserError:
        return ERROR
    _same_tensors(tensors, _intact("imo-adapter")["tensors"], "IMO adapter file")
    return VALID


def _read_ogd_basis(folder: Path) -> str:
    from mtil.errors import UserError
    from mtil.methods.ogd import load_basis

    try:
        basis, _ = load_basis(folder / "grad_ToyShape.pth")
    except UserError:
        return ERROR
    _same_tensors(basis, _intact("ogd-basis")["basis"], "OGD basis")
    return VALID


# source -> (the intact file's bytes, its name in a case's folder, the reader that uses it as mtil does)
TENSOR_FILES: dict[str, tuple[Callable[[], bytes], Callable[[], str], Callable[[Path], str]]] = {
    "checkpoint": (lambda: base_checkpoint(), lambda: "latest.pth", _read_checkpoint),
    "feature-cache": (lambda: base_feature_entry(), feature_entry_name, _read_feature_entry),
    "imo-adapter": (lambda: base_imo_adapter(), lambda: "imo.pt", _read_imo_adapter),
    "ogd-basis": (lambda: base_ogd_basis(), lambda: "grad_ToyShape.pth", _read_ogd_basis),
}


# ---------------------------------------------------------------------------------------------- path flags
# Every flag of mtil.main that names a file or folder, with a command it takes part in.
TRAIN_BASE = (*("--model", "micro-vit", "--device", "cpu", "--workers", "0"), "--train-dataset", "ToyShape",
              "--iterations", "2")
EVAL_BASE = ("--model", "micro-vit", "--device", "cpu", "--workers", "0", "--eval-only", "--eval-datasets", "ToyShape")
PATH_FLAG_BASES = {
    "--save": (TRAIN_BASE, EVAL_BASE), "--load": (TRAIN_BASE, EVAL_BASE), "--config": (TRAIN_BASE, EVAL_BASE),
    "--sequence": (TRAIN_BASE[:6],), "--class-names": (EVAL_BASE,), "--clip-root": (TRAIN_BASE,),
    "--data-location": (TRAIN_BASE, EVAL_BASE), "--feature-cache": ((*TRAIN_BASE, "--method", "tip-adapter",
                                                                      "--shots", "2"),),
    "--imo-adapter": ((*TRAIN_BASE, "--method", "tip-adapter", "--shots", "2"),),
    "--orthogonal-gradients-path": ((*TRAIN_BASE, "--orthogonal-gradients", "2"),),
    "--ref-model": ((*TRAIN_BASE, "--method", "ZSCL", "--ref-dataset", "ToyShape"),),
    "--model": (TRAIN_BASE[2:], EVAL_BASE[2:]), "--eval-single": (EVAL_BASE[:6],), "--summarize": ((),),
}
LONG_NAME = "n" * 300  # one component over the 255 bytes of most file systems
LONG_PATH = "/".join(["p" * 200] * 25)  # 5000 characters: over PATH_MAX


def _path_value(kind: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """(the flag's value, the files it needs) for each kind of bad path."""
    return {
        "long-name": (f"{CASE_DIR}/{LONG_NAME}", ()),
        "long-path": (f"{CASE_DIR}/{LONG_PATH}", ()),
        "folder": (CASE_DIR, ()),
        "under-a-file": (f"{CASE_DIR}/plain/sub", (("plain", b"text"),)),
        "missing": (f"{CASE_DIR}/no/such/thing", ()),
    }[kind]


def path_cases() -> st.SearchStrategy:
    @st.composite
    def case(draw):
        flag = draw(st.sampled_from(sorted(PATH_FLAG_BASES)))
        base = draw(st.sampled_from(PATH_FLAG_BASES[flag]))
        kind = draw(st.sampled_from(["long-name", "long-path", "folder", "under-a-file", "missing", "binary",
                                     "zeros", "empty", "damaged"]))
        if kind in ("binary", "zeros", "empty", "damaged"):
            content = {"binary": draw(st.binary(min_size=1, max_size=300)), "zeros": bytes(2000), "empty": b"",
                       "damaged": draw(byte_damages("checkpoint"))}[kind]
            value, files = f"{CASE_DIR}/file", (("file", content),)
        else:
            value, files = _path_value(kind)
        if flag == "--summarize":
            argv = ("--summarize", value)
        elif flag == "--model":
            argv = ("--model", value, *base)
        else:
            argv = (*base, flag, value)
        return Case(argv=argv, files=files, deep=True)

    return case()


# ---------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """Files written into a fresh folder, then either a command line run through ``mtil.main.main`` (``argv``,
    with ``{dir}`` standing for the folder) or a reader called on ``target`` (a file name in the folder)."""

    argv: tuple[str, ...] = ()
    files: tuple[tuple[str, Any], ...] = ()  # (name, bytes or Damage)
    deep: bool = False  # run the job's file-reading checks too (SequenceRunner.prepare / evaluate up to its work)
    target: str = ""

    def write(self, folder: Path) -> None:
        for name, content in self.files:
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.materialize() if isinstance(content, Damage) else content)

    def command(self, folder: Path) -> list[str]:
        return [a.replace(CASE_DIR, str(folder)) for a in self.argv]


def _preflight(args, deep: bool) -> int:
    """Stand-in for ``mtil.main.run``: the job's checks, stopping before anything is trained or written."""
    from mtil import jobs, registry
    from mtil.args import path_flags, settings_of
    from mtil.engine.checkpoint import config_for_checkpoint
    from mtil.engine.sequence import SequenceRunner
    from mtil.hardware import resolve_device

    if args.summarize:  # reads results.jsonl and writes the reports beside it: only a case's own folder
        return jobs.summarize(args) if deep else 0
    training = not (args.eval_single or args.eval_only or not (args.train_dataset or args.sequence))
    if training:
        runner = SequenceRunner(args, registry.build_components(args), path_flags())
        if deep:
            runner.prepare()  # every check; reads files, writes none
        else:
            runner.check_settings()
        return 0
    if deep and not args.eval_single:
        with mock.patch("mtil.evaluation.zeroshot.ZeroShotEvaluator.evaluate", side_effect=ReachedWork):
            try:
                jobs.evaluate(args)
            except ReachedWork:
                pass
        return 0
    resolve_device(args.device)
    config_for_checkpoint(settings_of(args), roles=args._roles)
    return 0


def run_main(argv: list[str], deep: bool = False) -> str:
    """``mtil.main.main(argv)`` with the job replaced by :func:`_preflight`; "valid" (exit 0) or "error" (exit 2
    and one ``mtil: error:`` line). Anything else raises."""
    import mtil.main as entry

    err = io.StringIO()
    with mock.patch.object(entry, "run", lambda args: _preflight(args, deep)), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = entry.main(list(argv))
    lines = err.getvalue().split("\n")  # what a terminal or a log shows as lines
    if lines[-1] == "":
        lines.pop()
    errors = [line for line in lines if line.startswith("mtil: error:")]
    stray = [line for line in lines if not line.startswith("mtil: ")]
    if code == 0 and not errors and not stray:
        return VALID
    if code == 2 and len(errors) == 1 and not stray:
        return ERROR
    raise BadExit(f"exit code {code}, stderr: {err.getvalue()[-600:]!r}")


MAX_PARAMETERS = 50_000_000  # a ViT-B/16 has 150 M; the models the fuzz builds are tiny


def _guarded_build(build):
    def build_clip(arch, seed=None):
        from dataclasses import asdict

        sizes = asdict(arch)
        layers = sizes["vision_layers"]
        layers = sum(layers) if isinstance(layers, (tuple, list)) else layers
        try:
            width = max(int(sizes["vision_width"]), int(sizes["transformer_width"]), 1)
            estimate = ((int(layers) + int(sizes["transformer_layers"])) * 12 * width * width
                        + int(sizes["vocab_size"]) * int(sizes["transformer_width"])
                        + int(sizes["image_resolution"]) ** 2 * width)
        except (TypeError, ValueError):
            estimate = 0
        if estimate > MAX_PARAMETERS:
            raise HugeModel(f"a file made mtil build a CLIP of about {estimate:.3g} parameters: {sizes}")
        return build(arch, seed)

    return build_clip


@contextlib.contextmanager
def fuzz_environment():
    """No network, no giant models, no heat-map rendering, no Python warnings on stderr; restored afterwards."""
    from mtil.evaluation import matrix as mx
    from mtil.models import clip_loading

    def no_download(url, root, *args, **kwargs):
        raise OSError(f"network disabled while fuzzing ({url})")

    def heatmap_data(long, order, path, title=""):  # everything plot_heatmap computes, without rendering
        wide = mx.to_wide(long, order)
        wide.to_numpy(dtype=float)
        [mx._row_label(int(i), order) for i in wide.index]
        return Path(path)

    with mock.patch.object(clip_loading.clip_api, "_download", no_download), \
            mock.patch.object(clip_loading, "build_clip", _guarded_build(clip_loading.build_clip)), \
            mock.patch.object(mx, "plot_heatmap", heatmap_data), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def case_folder():
    folder = Path(tempfile.mkdtemp(prefix="mtil-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- readers
def _read_metrics(folder: Path) -> str:
    from mtil.evaluation.metrics_io import read_metrics

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rows = read_metrics(folder / "metrics_A.csv")
    assert isinstance(rows, dict)
    return ERROR if "is damaged" in err.getvalue() else VALID


def _read_results(folder: Path) -> str:
    from mtil.evaluation.metrics_io import metrics_from_results, read_result_records

    records = read_result_records(folder / "results.jsonl")
    assert all(isinstance(r, dict) for r in records)
    metrics_from_results(folder / "results.jsonl", "A")
    return VALID


def _read_matrix(folder: Path) -> str:
    """What a resumed run does with accuracy_matrix.csv: read it (or rebuild it from results.jsonl), add the
    evaluation just made, pivot it for the table."""
    from mtil.records.files import read_or_rebuild_matrix
    from mtil.errors import UserError
    from mtil.evaluation import matrix as mx

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            long = read_or_rebuild_matrix(folder / "accuracy_matrix.csv")
    except UserError:
        return ERROR
    long = mx.upsert_rows(long, [{"after_task": 2, "dataset": "B", "top1": 50.0, "top5": 90.0}])
    mx.to_wide(long, ["A", "B"])
    return ERROR if "is damaged" in err.getvalue() else VALID


READERS: dict[str, Callable[[Path], str]] = {"metrics": _read_metrics, "results": _read_results,
                                             "matrix": _read_matrix,
                                             **{f"tensor:{k}": v[2] for k, v in TENSOR_FILES.items()}}


def run_case(case: Case) -> str:
    """Run one case in a fresh folder under :func:`fuzz_environment`: "valid", "error", or it raises."""
    with fuzz_environment(), case_folder() as folder:
        case.write(folder)
        if case.target:
            return READERS[case.target](folder)
        return run_main(case.command(folder), deep=case.deep)


# ---------------------------------------------------------------------------------------------- targets
def _cli_cases():
    return command_lines().map(lambda argv: Case(argv=argv))


def _config_cases():
    files = yaml_files(config_documents(), VALID_CONFIG, TRICKY_YAML)
    extra = st.sampled_from([(), ("--train-dataset", "ToyShape"), (*FAST, "--iterations", "2"), ("--eval-only",),
                             (*FAST, "--train-dataset", "ToyShape", "--iterations", "2"), ("--eval-only", *FAST)])
    return st.builds(lambda content, more: Case(argv=("--config", f"{CASE_DIR}/c.yaml", *more),
                                                files=(("c.yaml", content),)), files, extra)


def _sequence_cases():
    files = yaml_files(sequence_documents(), VALID_SEQUENCE, TRICKY_SEQUENCES)
    extra = st.sampled_from([(), ("--iterations", "2"), ("--epochs", "1", "--lr", "1e-3")])
    return st.builds(lambda content, more: Case(argv=(*FAST, "--sequence", f"{CASE_DIR}/s.yaml", *more),
                                                files=(("s.yaml", content),)), files, extra)


def _resume_cases():
    def case(damage: Damage, keep_previous: bool) -> Case:
        files = [("run/latest.pth", damage)]
        if keep_previous:
            files.append(("run/latest.prev.pth", Damage("none")))
        return Case(argv=RESUME_ARGV, files=tuple(files), deep=True)

    return st.builds(case, damages(), st.booleans())


def _load_cases():
    return st.builds(lambda damage, job: Case(argv=LOAD_ARGVS[job], files=(("weights.pth", damage),), deep=True),
                     damages(), st.sampled_from(sorted(LOAD_ARGVS)))


def _metrics_cases():
    valid = valid_metric_files()
    return st.builds(lambda csv, results: Case(target="metrics", files=(("metrics_A.csv", csv),)
                                               + ((("results.jsonl", results),) if results is not None else ())),
                     csv_files(valid["metrics_A.csv"], ["iteration", "top1", "top5"]),
                     st.none() | results_files(valid["results.jsonl"]))


def _results_cases():
    return results_files(valid_metric_files()["results.jsonl"]).map(
        lambda content: Case(target="results", files=(("results.jsonl", content),)))


def _matrix_cases():
    valid = valid_metric_files()
    return st.builds(lambda csv, results: Case(target="matrix", files=(("accuracy_matrix.csv", csv),)
                                               + ((("results.jsonl", results),) if results is not None else ())),
                     csv_files(valid["accuracy_matrix.csv"], ["after_task", "dataset", "top1", "top5"]),
                     st.none() | results_files(valid["results.jsonl"]))


def _summarize_cases():
    extra = st.sampled_from([(), ("--method", "ZSCL")])
    return st.builds(lambda results, more: Case(argv=("--summarize", CASE_DIR, *more),
                                                files=(("results.jsonl", results),), deep=True),
                     results_files(valid_metric_files()["results.jsonl"]), extra)


def _tensor_file_cases():
    def case(source: str, damage: Damage) -> Case:
        return Case(target=f"tensor:{source}", files=((TENSOR_FILES[source][1](), damage),))

    return st.sampled_from(sorted(TENSOR_FILES)).flatmap(lambda source: byte_damages(source).map(
        lambda damage: case(source, damage)))


def _path_cases():
    return path_cases()


@dataclass(frozen=True)
class Target:
    name: str
    what: str
    cases: Callable[[], st.SearchStrategy[Case]]
    examples: int = 100  # in the test suite (the script takes --examples)


TARGETS = [
    Target("cli", "random flags of the real parser with random values (parse_args, validation, SequenceRunner "
                  "checks)", _cli_cases, 300),
    Target("config", "--config YAML files: random documents, tricky YAML, random bytes, mutations", _config_cases, 150),
    Target("sequence", "--sequence files (read_sequence_file through the command line)", _sequence_cases, 150),
    Target("resume", "a damaged latest.pth in --save (load_resumable and SequenceRunner.prepare)", _resume_cases, 60),
    Target("load", "a damaged --load file (training and --eval-only)", _load_cases, 60),
    Target("metrics", "metrics_<Dataset>.csv (read_metrics, rebuilt from results.jsonl)", _metrics_cases, 100),
    Target("results", "results.jsonl (read_result_records, metrics_from_results)", _results_cases, 100),
    Target("matrix", "accuracy_matrix.csv (read_matrix / rebuild from results.jsonl, as on resume)",
           _matrix_cases, 100),
    Target("summarize", "--summarize on a random or damaged results.jsonl", _summarize_cases, 80),
    Target("tensors", "damaged checkpoints, feature-cache entries, IMO adapters and OGD bases, read as mtil reads "
                      "them: refused, or read back exactly as written", _tensor_file_cases, 100),
    Target("paths", "every path flag of mtil.main given a name over 255 bytes, a path over PATH_MAX, a folder, a "
                    "file's child, random or zeroed or damaged bytes", _path_cases, 100),
]
TARGETS_BY_NAME = {t.name: t for t in TARGETS}


def describe(case: Case) -> str:
    """A short, readable reproducer of ``case`` (the script also saves its files)."""
    parts = []
    if case.target:
        parts.append(f"reader {case.target}")
    if case.argv:
        parts.append("python -m mtil.main " + " ".join(repr(a) if (not a or any(c in a for c in " \n'\"\\"))
                                                       else a for a in case.argv))
    for name, content in case.files:
        shown = repr(content) if isinstance(content, Damage) else repr(content[:160]) + (
            f"... ({len(content)} bytes)" if len(content) > 160 else "")
        parts.append(f"{CASE_DIR}/{name} = {shown}")
    return "\n    ".join(parts)
