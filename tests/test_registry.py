"""A method is one file: registration, flags in their own group, compatibility declarations, hook order, plugins,
zero-step tasks, and the one direction of dependency (the engine imports no method)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtil import args as mtil_args
from mtil import registry
from mtil.engine.method import Method, ordered
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods.finetune import Finetune
from tests.helpers import load

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]

PLUGIN = '''
"""A throw-away method: fine-tuning with its cross-entropy scaled by --throwaway-scale."""
from mtil.args import add_flag, positive_float
from mtil.methods.finetune import Finetune
from mtil.registry import register


@register
class Throwaway(Finetune):
    name = "throwaway"
    summary = "fine-tuning with a scaled loss (a test plugin)"
    flag_group = ("Throwaway", "A method from a plugin file.")

    @classmethod
    def add_arguments(cls, group):
        add_flag(group, "--throwaway-scale", type=positive_float, default=1.0, help="Factor on the loss.")

    def loss(self, run, batch):
        losses = super().loss(run, batch)
        return {"scaled_ce": self.config.throwaway_scale * losses["ce"]}
'''


def _run_cli(args: list[str], cwd: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "mtil.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_method_in_a_plugin_file_runs_from_the_command_line(tmp_path):
    plugin = tmp_path / "throwaway_method.py"
    plugin.write_text(PLUGIN)
    env = {"MTIL_PLUGINS": str(plugin)}

    shown = _run_cli(["--help"], tmp_path, env)
    assert shown.returncode == 0, shown.stderr
    assert "--throwaway-scale" in shown.stdout and "throwaway" in shown.stdout and "Throwaway" in shown.stdout

    save = tmp_path / "run"
    done = _run_cli([*FAST, "--method", "throwaway", "--throwaway-scale", "3", "--train-dataset", "ToyShape",
                     "--iterations", "2", "--log-every", "1", "--save", str(save)], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scaled_ce" in done.stdout  # its loss term is the one trained and reported
    assert (save / "ToyShape.pth").is_file() and (save / "accuracy_matrix.csv").is_file()
    assert "throwaway_scale: 3.0" in (save / "config.yaml").read_text()
    assert load(save / "ToyShape.pth")["config"]["method"] == "throwaway"

    # Its flag belongs to it: given to another method it would do nothing, so it is refused.
    refused = _run_cli([*FAST, "--throwaway-scale", "3", "--train-dataset", "ToyShape", "--iterations", "2"],
                       tmp_path, env)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--throwaway-scale" in refused.stderr and "throwaway" in refused.stderr


def test_a_broken_method_file_does_not_break_the_cli(tmp_path):
    broken = tmp_path / "broken_method.py"
    broken.write_text("raise ImportError('needs a package that is not installed')\n")
    env = {"MTIL_PLUGINS": str(broken)}
    done = _run_cli([*FAST, "--train-dataset", "ToyShape", "--iterations", "1"], tmp_path, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "broken_method.py failed to import" in done.stderr and "ImportError" in done.stderr


def test_the_engine_imports_no_method():
    """One direction of dependency: mtil/engine uses nothing from mtil/methods or the registry."""
    offenders = []
    for path in (REPO / "mtil" / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("mtil.methods", "mtil.registry"))]
    assert offenders == []


def test_no_list_of_method_names_outside_the_method_files():
    """--method's choices are the registered names; the parser has no list of its own."""
    parser = mtil_args.build_parser()
    action = next(a for a in parser._actions if a.dest == "method")
    assert sorted(action.choices) == sorted(registry.registered("method"))
    source = (REPO / "mtil" / "args.py").read_text()
    for name in ("lwf-vr", "icarl", '"ZSCL"'):
        assert name not in source


def test_every_flag_is_owned_once_and_documented():
    parser = mtil_args.build_parser()
    owners = parser.flag_owners
    for cls in registry.registered().values():
        assert cls.summary, f"{cls.__name__} needs a summary for --help"
        if cls.kind == "component":
            assert cls.enable_flag, f"{cls.__name__} needs enable_flag for messages"
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    assert len(dests) == len(set(dests))
    assert {"ref_dataset", "memory_size", "l2", "we", "ema", "wise_merge", "lora", "orthogonal_gradients",
            "T", "lwf_sentences"} <= set(owners)
    readme = (REPO / "README.md").read_text()
    for name in registry.registered():
        shown = registry.registered()[name].enable_flag.split()[0] if registry.registered()[name].kind == \
            "component" else f"`{name}`"
        assert shown in readme, f"README does not mention {name}"


def test_hook_order_matches_the_declarations():
    config = mtil_args.parse_args(["--train-dataset", "ToyShape", "--method", "lwf", "--lora", "--l2", "1",
                                   "--ema", "0.9", "--wise-merge"])
    components = registry.build_components(config)
    assert [c.name for c in components] == ["lwf", "lora", "l2", "ema", "wise_merge"]
    # LoRA injects right after the method, and merges after the EMA produced the adapters, before WiSE blends.
    assert [c.name for c in ordered(components, "before_task")] == ["lwf", "lora", "l2", "ema", "wise_merge"]
    assert [c.name for c in ordered(components, "after_task")] == ["lwf", "l2", "ema", "lora", "wise_merge"]


@pytest.mark.parametrize(("flags", "fragments"), [
    (["--method", "contrastive", "--train-mode", "image"], ["--method contrastive", "--train-mode image"]),
    (["--method", "ZSCL", "--train-mode", "text"], ["--method ZSCL", "image encoder"]),
    (["--we", "--ema", "0.9"], ["cannot run together"]),
    (["--method", "zeroshot", "--l2", "1"], ["trains nothing", "--iterations"]),
    (["--memory-size", "50"], ["--memory-size", "icarl"]),
    (["--method", "ZSCL", "--ref-wise-alpha", "0.5"], ["--ref-wise-alpha", "--ref-wise"]),
    (["--optimizer", "sgd", "--beta2", "0.99"], ["--beta2", "adamw"]),
    (["--momentum", "0.9"], ["--momentum", "sgd"]),
])
def test_incompatible_combinations_are_one_line_errors(flags, fragments, capsys):
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtil: error:") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_the_zeroshot_method_takes_no_component(capsys):
    flags = ["--model", "micro-vit", "--workers", "0", "--device", "cpu", "--train-dataset", "ToyShape"]
    assert main([*flags, "--method", "zeroshot", "--l2", "1"]) == 2
    err = capsys.readouterr().err
    assert "--method zeroshot does not combine with" in err and "--l2" in err and err.count("\n") == 1


def test_several_processes_are_refused_until_a_method_declares_support(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")  # as torchrun sets them; finetune and LwF declare support
    monkeypatch.setenv("WORLD_SIZE", "2")  # (tests/test_distributed.py), the embedding adapter does not
    assert main([*FAST, "--method", "embedding-adapter", "--train-dataset", "ToyShape", "--iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 processes" in err and "--method embedding-adapter" in err and err.count("\n") == 1


class HookCounter(Method):
    """A training-free test method that counts its hooks."""

    name = "hook-counter"
    summary = "counts hooks (test)"
    training_free = True
    works_with = ()
    calls: list[tuple[str, str]] = []

    def before_task(self, run, task):
        HookCounter.calls.append(("before_task", task.name))

    def loss(self, run, batch):  # pragma: no cover - a zero-step task has no step
        raise AssertionError("a zero-step task computed a loss")

    def after_task(self, run, task):
        HookCounter.calls.append(("after_task", task.name))


def test_a_zero_step_task_still_gets_its_hooks_row_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, HookCounter.name, HookCounter)
    HookCounter.calls = []
    save = tmp_path / "run"
    flags = ["--model", "micro-vit", "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
    assert main([*flags, "--method", "hook-counter", "--train-dataset", "ToyShape,ToyColor", "--save",
                 str(save)]) == 0
    assert HookCounter.calls == [("before_task", "ToyShape"), ("after_task", "ToyShape"),
                                 ("before_task", "ToyColor"), ("after_task", "ToyColor")]
    long = mx.read_matrix(save / "accuracy_matrix.csv")
    assert sorted(set(long["after_task"])) == [0, 1, 2]
    for name in ("ToyShape.pth", "ToyColor.pth", "latest.pth"):
        checkpoint = load(save / name)
        assert "optimizer" not in checkpoint and checkpoint["iteration"] == 0


def test_the_zeroshot_method_is_the_control_row(tmp_path):
    """Nothing trains: every row of the matrix is the zero-shot row, every checkpoint holds the start weights,
    and Transfer / Avg / Last follow from the zero-shot accuracies alone."""
    save = tmp_path / "zs"
    flags = ["--model", "micro-vit", "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
    assert main([*flags, "--method", "zeroshot", "--train-dataset", "ToyShape,ToyColor,ToyCount", "--save",
                 str(save)]) == 0
    long = mx.read_matrix(save / "accuracy_matrix.csv")
    wide = {(int(r.after_task), r.dataset): r.top1 for r in long.itertuples()}
    zero = {d: wide[(0, d)] for d in ("ToyShape", "ToyColor", "ToyCount")}
    for (row, dataset), value in wide.items():
        assert value == zero[dataset], (row, dataset)
    summary = mx.read_summary(save / "summary.csv")[0]
    assert summary["last"] == pytest.approx(sum(zero.values()) / 3, abs=1e-3)
    assert summary["transfer"] == pytest.approx((zero["ToyColor"] + zero["ToyCount"]) / 2, abs=1e-3)
    from mtil.models.clip_loading import load_clip

    start = load_clip("micro-vit", seed=0).model.state_dict()
    final = load(save / "ToyCount.pth")["model"]
    assert all(torch.equal(final[k], start[k]) for k in start)
    records = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"zeroshot"}


def test_finetune_class_is_the_registered_one():
    assert registry.method_class("finetune") is Finetune
    with pytest.raises(Exception, match="unknown --method 'nope'"):
        registry.method_class("nope")
