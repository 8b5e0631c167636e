"""Every mistake is refused before anything is written: one line, exit code 2, and the --save folder unchanged
(not created when it did not exist; byte for byte the same when it holds a run). The corrected command then
resumes that run instead of being refused as "other settings"."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from mtil.main import main
from tests.fixtures.dataset_formats import make_mnist
from tests.helpers import load, run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
BASE = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "4", "--checkpoint-interval", "2",
        "--eval-datasets", "ToyShape,ToyColor"]


def _without(argv: list[str], flag: str, values: int = 1) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + values:]


def _with_sequence(tmp: Path, text: str) -> list[str]:
    path = tmp / "sequence.yaml"
    path.write_text(text)
    return [*_without(BASE, "--train-dataset"), "--sequence", str(path)]


def _mnist(tmp: Path, damage) -> list[str]:
    root = tmp / "data"
    make_mnist(root)
    damage(root / "MNIST" / "raw" / "train-images-idx3-ubyte")
    return [*_without(BASE, "--train-dataset"), "--train-dataset", "MNIST", "--data-location", str(root)]


def _config(tmp: Path, text: str) -> list[str]:
    path = tmp / "settings.yaml"
    path.write_text(text)
    return [*BASE, "--config", str(path)]


def _non_utf8(tmp: Path, flag: str, name: str, text: bytes) -> list[str]:
    path = tmp / name
    path.write_bytes(text)
    base = _without(BASE, "--train-dataset") if flag == "--sequence" else BASE
    return [*base, flag, str(path)]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


# (id, argv builder (tmp folder -> argv), fragments the one line must contain)
MISTAKES = [
    ("freeze-typo", lambda t: [*BASE, "--freeze", "visual.conv9.*"], ["--freeze", "visual.conv9.*"]),
    ("ogd-params-typo", lambda t: [*BASE, "--orthogonal-gradients", "2", "--ogd-params", "*atn.in_proj_weight"],
     ["--ogd-params", "*atn.in_proj_weight"]),
    ("lora-target-typo", lambda t: [*BASE, "--lora", "--lora-target-modules", "attn.qq"],
     ["--lora-target-modules", "attn.qq"]),
    ("sequence-ls", lambda t: _with_sequence(t, "tasks:\n  - {dataset: ToyShape, ls: 1.5}\n  - ToyColor\n"),
     ["ls", "1.5"]),
    ("sequence-lr-nan", lambda t: _with_sequence(t, "tasks:\n  - {dataset: ToyShape, lr: .nan}\n"), ["lr", "nan"]),
    ("sequence-lr-inf", lambda t: _with_sequence(t, "tasks:\n  - {dataset: ToyShape, lr: .inf}\n"), ["lr", "inf"]),
    ("sequence-unknown-key", lambda t: _with_sequence(t, "tasks:\n  - {dataset: ToyShape, learning_rate: 1}\n"),
     ["learning_rate"]),
    ("sequence-zero-iterations", lambda t: _with_sequence(t, "tasks:\n  - {dataset: ToyShape, iterations: 0}\n"),
     ["iterations"]),
    ("forgotten-iterations", lambda t: _without(BASE, "--iterations"), ["--iterations", "--epochs"]),
    ("beta2-one", lambda t: [*BASE, "--beta2", "1.0"], ["--beta2"]),
    ("beta2-negative", lambda t: [*BASE, "--beta2", "-0.1"], ["--beta2"]),
    ("beta2-nan", lambda t: [*BASE, "--beta2", "nan"], ["--beta2"]),
    ("lr-inf", lambda t: [*BASE, "--lr", "inf"], ["--lr"]),
    ("ls-too-big", lambda t: [*BASE, "--ls", "1.5"], ["--ls"]),
    ("we-and-ema", lambda t: [*BASE, "--we", "--ema", "0.9"], ["--we", "--ema"]),
    ("iterations-and-epochs", lambda t: [*BASE, "--epochs", "2"], ["--iterations", "--epochs"]),
    ("lora-with-ogd", lambda t: [*BASE, "--lora", "--orthogonal-gradients", "2"], ["cannot run together"]),
    ("mode-of-method", lambda t: [*BASE, "--method", "contrastive", "--train-mode", "image"], ["--train-mode"]),
    ("distillation-in-text-mode", lambda t: [*BASE, "--method", "lwf", "--train-mode", "text"], ["--train-mode text"]),
    ("flag-of-another-method", lambda t: [*BASE, "--memory-size", "10"], ["--memory-size"]),
    ("unknown-method", lambda t: [*BASE, "--method", "zscl"], ["--method", "zscl"]),
    ("missing-reference-data", lambda t: [*BASE, "--method", "ZSCL", "--data-location", str(t / "empty")],
     ["ImageNet"]),
    ("mnist-zero-byte", lambda t: _mnist(t, lambda p: p.write_bytes(b"")), ["MNIST", "could not be read"]),
    ("mnist-truncated", lambda t: _mnist(t, _truncate), ["MNIST", "could not be read"]),
    ("config-unknown-key", lambda t: _config(t, "learning_rate: 0.1\n"), ["--config", "learning_rate"]),
    ("config-bad-value", lambda t: _config(t, "beta2: 2\n"), ["--config", "--beta2"]),
    ("eval-datasets-typo", lambda t: [*BASE, "--eval-datasets", "ToyShape,ToyColour"], ["ToyColour"]),
    ("lora-only-in-a-frozen-encoder", lambda t: [*BASE, "--lora", "--lora-target-modules",
                                                 "visual.transformer.resblocks.0.attn", "--train-mode", "text"],
     ["--lora-target-modules", "no adapter to train"]),
    ("frozen-head-and-encoder", lambda t: [*BASE, "--train-mode", "image-fc-fixed", "--freeze", "visual.*"],
     ["nothing to train"]),
    ("repeated-dataset", lambda t: [*BASE, "--train-dataset", "ToyShape,ToyShape"], ["ToyShape", "more than once"]),
    ("unsupported-device", lambda t: [*BASE, "--device", "meta"], ["--device", "meta"]),
    ("sequence-not-utf8", lambda t: _non_utf8(t, "--sequence", "s.yaml", b"tasks:\n  - ToyShape\xff\xfe\n"),
     ["--sequence", "s.yaml"]),
    ("config-not-utf8", lambda t: _non_utf8(t, "--config", "c.yaml", b"lr: 0.1\xff\n"), ["--config", "c.yaml"]),
    ("device-xla", lambda t: [*BASE, "--device", "xla"], ["--device", "xla"]),
    ("negative-seed", lambda t: [*BASE, "--seed", "-1"], ["--seed", "-1"]),
    ("huge-seed", lambda t: [*BASE, "--seed", "1" * 31], ["--seed"]),
    ("huge-eval-batch", lambda t: [*BASE, "--batch-size-eval", str(2**63)], ["--batch-size-eval"]),
    ("thousands-of-workers", lambda t: [*BASE, "--workers", "1151"], ["--workers", "1151"]),
    ("negative-skip-nonfinite", lambda t: [*BASE, "--skip-nonfinite", "-1"], ["--skip-nonfinite"]),
    ("abbreviated-flag", lambda t: [*BASE, "--conf", str(t / "x.yaml")], ["--conf"]),
    ("untrained-with-load", lambda t: [*BASE, "--untrained", "--load", str(t / "x.pth")], ["--untrained", "--load"]),
    ("wise-ft-in-training", lambda t: [*BASE, "--wise-ft", "--load", str(t / "x.pth")], ["--wise-ft", "--wise-merge"]),
    ("drawn-sentences-under-lwf", lambda t: [*BASE, "--method", "lwf", "--ref-sentences-count", "10"],
     ["--ref-sentences-count"]),
    ("drawn-count-for-all-sentences", lambda t: [*BASE, "--method", "ZSCL", "--ref-sentences", "ToyCaptions",
                                                  "--ref-dataset", "ToyCaptions", "--ref-sentences", "dataset:ToyShape",
                                                  "--ref-sentences-count", "10"], ["--ref-sentences-count"]),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_line_refusal(capsys, argv: list[str], fragments: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtil: error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory) -> Path:
    """A run of BASE killed at step 3 of its first task (its last checkpoint is from step 2)."""
    save = tmp_path_factory.mktemp("unfinished") / "run"
    with pytest.MonkeyPatch.context() as patch:
        run_killed_at(patch, [*BASE, "--save", str(save)], [], 3)
    assert load(save / "latest.pth")["state"]["step"] == 2
    return save


def test_a_save_path_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    for argv in ([*BASE, "--save", str(target)], ["--model", "micro-vit", "--eval-only", "--save", str(target)]):
        _assert_one_line_refusal(capsys, argv, ["--save", "is a file"])
    assert target.read_text() == "mine"


@pytest.mark.parametrize(("name", "build", "fragments"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_creates_no_save_folder(name, build, fragments, tmp_path, capsys):
    save = tmp_path / "new-run"
    _assert_one_line_refusal(capsys, [*build(tmp_path), "--save", str(save)], fragments)
    assert not save.exists()


@pytest.mark.parametrize(("name", "build", "fragments"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_leaves_a_saved_run_untouched_and_resumable(name, build, fragments, tmp_path, capsys,
                                                              unfinished_run):
    save = tmp_path / "run"
    shutil.copytree(unfinished_run, save)
    before = _snapshot(save)
    _assert_one_line_refusal(capsys, [*build(tmp_path), "--save", str(save)], fragments)
    assert _snapshot(save) == before
    # The corrected command resumes the run (it is not refused as an unfinished run with other settings).
    assert main([*BASE, "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "resuming ToyShape at step 2/4" in out
    assert load(save / "latest.pth")["state"]["completed"] == ["ToyShape", "ToyColor"]
