"""Orthogonal gradient descent (``--orthogonal-gradients``): the basis math, the hook in real runs, the basis files,
the chain across processes (``--orthogonal-gradients-path``), exact resume and the flags' errors."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtil.main import main
from mtil.methods.ogd import (
    DEFAULT_PATTERNS,
    OrthogonalGradients,
    is_orthonormal,
    merge_bases,
    orthonormal_basis,
    project_out,
)
from tests.helpers import load, run_killed_at

ROOT = Path(__file__).resolve().parent.parent

COMMAND = ["--model", "micro-vit", "--iterations", "6", "--batch-size", "8", "--lr", "1e-3",
           "--warmup-length", "2", "--eval-datasets", "ToyShape", "--max-evaluation-size", "8",
           "--batch-size-eval", "8", "--workers", "0", "--device", "cpu", "--checkpoint-interval", "2",
           "--orthogonal-gradients", "3"]
TWO_TASKS = [*COMMAND, "--train-dataset", "ToyShape,ToyColor", "--ogd-save-raw"]


def random_orthonormal(rows: int, width: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(width, rows, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q.T.contiguous()


def residual(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Each row of ``rows`` projected off ``basis`` (project_out, one row at a time)."""
    return torch.stack([project_out(row, basis) for row in rows.reshape(rows.shape[0], -1)])


def gram_error(basis: torch.Tensor) -> float:
    b = basis.to(torch.float64)
    return float((b @ b.T - torch.eye(b.shape[0], dtype=torch.float64)).abs().max())


# --------------------------------------------------------------------------- the math
def test_basis_is_orthonormal():
    snapshots = torch.randn(7, 500, generator=torch.Generator().manual_seed(0))
    basis = orthonormal_basis(snapshots, energy=1.0)
    assert basis.shape == (7, 500) and basis.dtype == torch.float32
    assert gram_error(basis) < 1e-5
    # it spans the snapshots: projecting them off the basis leaves nothing
    assert float(residual(snapshots, basis).norm() / snapshots.norm()) < 1e-5


def test_energy_threshold_keeps_the_right_number_of_directions():
    """Singular values 10, 5, 1, 0.1 (energies 100, 25, 1, 0.01 of 126.01)."""
    directions = random_orthonormal(4, 64, seed=1)
    mixing = random_orthonormal(4, 4, seed=2)
    snapshots = (mixing.T @ torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64)) @ directions)
    expected = {0.5: 1, 0.79: 1, 0.8: 2, 0.97: 2, 0.992: 3, 0.9999: 3, 0.99995: 4, 1.0: 4}
    for energy, count in expected.items():
        basis = orthonormal_basis(snapshots.float(), energy)
        assert basis.shape[0] == count, (energy, basis.shape)
        assert gram_error(basis) < 1e-5
        # the kept rows are the leading directions (up to sign)
        overlap = (basis.double() @ directions[:count].T).abs()
        assert torch.allclose(overlap, torch.eye(count, dtype=torch.float64), atol=1e-4), energy
    # a rank-deficient input: no direction beyond the rank, and zero gradients give an empty basis
    assert orthonormal_basis(torch.cat([snapshots, snapshots]).float(), 1.0).shape[0] == 4
    assert orthonormal_basis(torch.zeros(3, 10), 0.97).shape == (0, 10)


def test_projected_gradient_is_orthogonal_to_the_basis():
    basis = orthonormal_basis(torch.randn(5, 6 * 50, generator=torch.Generator().manual_seed(3)), 1.0)
    grad = torch.randn(6, 50, generator=torch.Generator().manual_seed(4))
    projected = project_out(grad, basis)
    assert projected.shape == grad.shape
    assert float((basis @ projected.reshape(-1)).abs().max()) < 1e-5 * float(grad.norm())
    # g = projected + its part in the span
    inside = grad.reshape(-1) - projected.reshape(-1)
    assert float(project_out(inside, basis).norm()) < 1e-5 * float(grad.norm())
    # an orthogonal gradient is left alone; one inside the span vanishes
    assert torch.allclose(project_out(projected, basis), projected, atol=1e-6)
    assert float(project_out(basis[0] * 3, basis).norm()) < 1e-5
    assert torch.equal(project_out(grad, torch.zeros(0, 300)), grad)


def test_merge_keeps_orthonormality_and_spans_both():
    axes = random_orthonormal(6, 80, seed=5)
    old = axes[:3].float()  # a1 a2 a3
    new = orthonormal_basis(torch.stack([axes[2] + axes[3], axes[4], axes[2] - axes[3]]).float(), 1.0)  # a3 a4 a5
    merged = merge_bases(old, new)
    assert merged.shape == (5, 80)  # a1..a5: the shared direction a3 is not added twice
    assert gram_error(merged) < 1e-5
    assert torch.equal(merged[:3], old)  # the earlier tasks' rows are kept as they are
    for rows in (old, new):
        assert float(residual(rows, merged).norm()) < 1e-5  # both lie in the merged span
    assert float(project_out(axes[5].float(), merged).norm()) > 0.999  # and nothing else does
    assert torch.equal(merge_bases(merged, new), merged)  # nothing new: unchanged
    assert gram_error(merge_bases(None, new)) < 1e-5


# --------------------------------------------------------------------------- real runs
def _record_hook(monkeypatch, records: list) -> None:
    """Wrap the component's hook: keep every tracked gradient before and after it."""
    original = OrthogonalGradients.after_backward

    def recording(self, run):
        params = dict(run.model.named_parameters())
        names = self.tracked_names(run.model)
        before = {n: params[n].grad.detach().clone() for n in names}
        original(self, run)
        after = {n: params[n].grad.detach().clone() for n in names}
        records.append({"task": run.task.name, "step": run.state.step, "before": before, "after": after})

    monkeypatch.setattr(OrthogonalGradients, "after_backward", recording)


def _assert_projected(records: list, basis: dict[str, torch.Tensor]) -> None:
    """Every gradient after the hook is orthogonal to ``basis``, and the hook really removed something."""
    removed = 0.0
    for record in records:
        for name, after in record["after"].items():
            before = record["before"][name]
            scale = float(before.norm()) + 1e-30
            assert float((basis[name] @ after.reshape(-1)).abs().max()) < 1e-5 * scale, (record["step"], name)
            removed = max(removed, float((before - after).norm()) / scale)
    assert removed > 1e-3, "the projection never changed a gradient"


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """An uninterrupted two-task run (also the reference of the resume test), every hook call recorded."""
    save = tmp_path_factory.mktemp("ogd") / "run"
    records: list = []
    with pytest.MonkeyPatch.context() as m:
        _record_hook(m, records)
        assert main([*TWO_TASKS, "--save", str(save)]) == 0
    return save, records


def test_two_task_run_projects_only_the_second_task(first):
    save, records = first
    assert [r["task"] for r in records] == ["ToyShape"] * 6 + ["ToyColor"] * 6
    assert [r["step"] for r in records] == list(range(6)) * 2
    names = set(records[0]["before"])
    assert names and all(any(n.endswith(p[1:]) for p in DEFAULT_PATTERNS) for n in names)
    assert any(n.startswith("visual.") for n in names) and any(not n.startswith("visual.") for n in names)
    assert len(names) == 8  # 4 matrices x 1 block x 2 encoders of micro-vit

    # task 1: nothing to project yet, the hook leaves every gradient exactly as backward made it
    for record in records[:6]:
        for name in names:
            assert torch.equal(record["before"][name], record["after"][name]), (record["step"], name)

    # task 2: projected off task 1's basis
    task1 = load(save / "grad_ToyShape.pth")
    _assert_projected(records[6:], task1["basis"])


def test_basis_files_are_written_and_load_weights_only(first):
    save, records = first
    task1, task2 = load(save / "grad_ToyShape.pth"), load(save / "grad_ToyColor.pth")
    assert task1["format"] == "mtil-ogd-basis" and task1["tasks"] == ["ToyShape"]
    assert task2["tasks"] == ["ToyShape", "ToyColor"] and task1["energy"] == 0.97
    assert set(task1["basis"]) == set(records[0]["before"])
    for name, basis in task1["basis"].items():
        numel = records[0]["before"][name].numel()
        assert basis.dtype == torch.float32 and basis.shape[1] == numel and 1 <= basis.shape[0] <= 3
        assert gram_error(basis) < 1e-5
        later = task2["basis"][name]
        assert gram_error(later) < 1e-5 and basis.shape[0] <= later.shape[0] <= 6
        assert torch.equal(later[:basis.shape[0]], basis)
    assert not list(save.glob(".*.tmp"))  # atomic writes leave no temporary files

    # the raw snapshots (--ogd-save-raw) are the gradients backward made at steps 0, 2 and 5
    raw = load(save / "grad_raw_ToyShape.pth")
    assert raw["steps"] == [0, 2, 5]
    for name, stacked in raw["gradients"].items():
        want = torch.stack([records[s]["before"][name].reshape(-1) for s in (0, 2, 5)])
        assert torch.equal(stacked, want), name
    # the method state holds the merged basis; no snapshots are left over at a task's end
    state = load(save / "ToyColor.pth")["methods"]["ogd"]
    assert state["tracker"] is None and state["tasks"] == ["ToyShape", "ToyColor"]
    for name, basis in task2["basis"].items():
        assert torch.equal(state["basis"][name], basis)


def test_convert_script_turns_raw_gradients_into_the_same_basis(first, tmp_path):
    save, _ = first
    out = tmp_path / "basis.pth"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_grad_to_basis.py"), "--input",
                           str(save / "grad_raw_ToyShape.pth"), "--output", str(out), "--energy", "0.97"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    got, want = load(out), load(save / "grad_ToyShape.pth")
    assert got["tasks"] == ["ToyShape"]
    for name, basis in want["basis"].items():
        assert got["basis"][name].shape == basis.shape
        assert float((got["basis"][name] - basis).abs().max()) < 1e-5

    # a plain dict of stacked gradients works too
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.randn(4, 30, generator=torch.Generator().manual_seed(0))}, plain)
    spec = importlib.util.spec_from_file_location("convert_grad_to_basis",
                                                  ROOT / "scripts" / "convert_grad_to_basis.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.convert(plain, tmp_path / "plain_basis.pth", 1.0) == {"w": 4}
    assert is_orthonormal(load(tmp_path / "plain_basis.pth")["basis"]["w"], atol=1e-5)


def test_basis_path_projects_the_first_task_of_another_process(first, tmp_path):
    """The one-task-per-process chain: task 2 run alone from task 1's checkpoint and basis file."""
    save, _ = first
    records: list = []
    with pytest.MonkeyPatch.context() as m:
        _record_hook(m, records)
        assert main([*COMMAND, "--train-dataset", "ToyColor", "--load", str(save / "ToyShape.pth"),
                     "--orthogonal-gradients-path", str(save / "grad_ToyShape.pth"),
                     "--save", str(tmp_path / "task2")]) == 0
    assert [r["task"] for r in records] == ["ToyColor"] * 6
    _assert_projected(records, load(save / "grad_ToyShape.pth")["basis"])
    written = load(tmp_path / "task2" / "grad_ToyColor.pth")
    assert written["tasks"] == ["ToyShape", "ToyColor"]
    # same weights, data and basis as task 2 of the one-process run: the same result
    for name, basis in load(save / "grad_ToyColor.pth")["basis"].items():
        assert torch.equal(written["basis"][name], basis), name


def test_killed_mid_task_resumes_with_the_same_basis(first, tmp_path, monkeypatch):
    """Killed at step 5 of task 2 (last checkpoint: step 4, snapshots of steps 0 and 2 taken); the same command
    resumes with the saved basis and snapshots and ends exactly as the uninterrupted run."""
    reference, _ = first
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*TWO_TASKS, "--save", str(save)], ["ToyShape"], 5)
    latest = load(save / "latest.pth")
    assert latest["state"]["step"] == 4
    state = latest["methods"]["ogd"]
    assert state["tasks"] == ["ToyShape"] and state["tracker"]["recorded_steps"] == [0, 2]
    assert not (save / "grad_ToyColor.pth").exists()

    assert main([*TWO_TASKS, "--save", str(save)]) == 0
    for name in ("ToyColor.pth", "grad_ToyColor.pth", "grad_raw_ToyColor.pth"):
        got, want = load(save / name), load(reference / name)
        key = {"ToyColor.pth": "model", "grad_ToyColor.pth": "basis", "grad_raw_ToyColor.pth": "gradients"}[name]
        assert got[key].keys() == want[key].keys()
        for tensor in want[key]:
            assert torch.equal(got[key][tensor], want[key][tensor]), (name, tensor)


def test_float16_snapshots(tmp_path):
    """--ogd-dtype float16 keeps the snapshots in half precision; the basis is still float32 and orthonormal."""
    save = tmp_path / "half"
    argv = [*COMMAND, "--train-dataset", "ToyShape", "--iterations", "3", "--ogd-dtype", "float16",
            "--ogd-save-raw", "--ogd-params", "visual.*mlp.c_fc.weight", "--save", str(save)]
    assert main(argv) == 0
    raw, basis = load(save / "grad_raw_ToyShape.pth"), load(save / "grad_ToyShape.pth")["basis"]
    assert list(raw["gradients"]) == list(basis) == ["visual.transformer.resblocks.0.mlp.c_fc.weight"]
    stacked = next(iter(raw["gradients"].values()))
    assert stacked.dtype == torch.float16 and stacked.shape == (3, 256 * 64) and raw["steps"] == [0, 1, 2]
    b = next(iter(basis.values()))
    assert b.dtype == torch.float32 and 1 <= b.shape[0] <= 3 and gram_error(b) < 1e-5


# --------------------------------------------------------------------------- flags
def _one_line_error(capsys, argv, *fragments):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtil: error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--orthogonal-gradients", "0"], ["--orthogonal-gradients", "0"]),
    (["--orthogonal-gradients", "-2"], ["--orthogonal-gradients"]),
    (["--orthogonal-gradients", "x"], ["--orthogonal-gradients", "x"]),
    (["--orthogonal-gradients", "3", "--ogd-energy", "0"], ["--ogd-energy"]),
    (["--orthogonal-gradients", "3", "--ogd_energy", "1.5"], ["--ogd-energy", "1.5"]),
    (["--orthogonal-gradients", "3", "--orthogonal-gradients-path", "/no/such/grad_DTD.pth"],
     ["--orthogonal-gradients-path", "/no/such/grad_DTD.pth"]),
    (["--orthogonal-gradients-path", __file__], ["--orthogonal-gradients N"]),
    (["--ogd-save-raw"], ["--ogd-save-raw", "--orthogonal-gradients N"]),
    (["--orthogonal-gradients", "3", "--ogd-dtype", "bfloat16"], ["--ogd-dtype"]),
    (["--orthogonal-gradients", "3", "--ogd-params", ","], ["--ogd-params"]),
])
def test_bad_flags_exit_2_with_one_line(capsys, argv, fragments):
    _one_line_error(capsys, argv, *fragments)


def test_unusable_setups_are_one_line_errors(capsys, first, tmp_path):
    save, _ = first
    base = ["--model", "micro-vit", "--train-dataset", "ToyShape", "--iterations", "1", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--eval-datasets", "ToyShape", "--max-evaluation-size", "4",
            "--orthogonal-gradients", "2"]
    _one_line_error(capsys, [*base, "--train-mode", "fc"], "--train-mode fc")
    # raw gradients where a basis is expected
    _one_line_error(capsys, [*base, "--orthogonal-gradients-path", str(save / "grad_raw_ToyShape.pth")],
                    "raw gradients", "convert_grad_to_basis")
    # patterns that match no trainable weight
    _one_line_error(capsys, [*base, "--ogd-params", "*no_such_weight", "--save", str(tmp_path / "x")],
                    "--ogd-params")
    # a basis of another model
    other = tmp_path / "other.pth"
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    torch.save({name: torch.eye(3, 7)}, other)
    _one_line_error(capsys, [*base, "--orthogonal-gradients-path", str(other), "--save", str(tmp_path / "y")],
                    name, "another model")


def test_fp16_steps_whose_gradients_overflowed_are_neither_recorded_nor_projected(tmp_path):
    """The gradient scaler skips an overflowed step; OGD must not put its inf gradients into the basis."""
    save = tmp_path / "fp16"
    assert main(["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
                 "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu", "--precision", "fp16",
                 "--train-dataset", "ToyShape,ToyColor", "--iterations", "4", "--orthogonal-gradients", "4",
                 "--ogd-save-raw", "--save", str(save)]) == 0
    raw = torch.load(save / "grad_raw_ToyShape.pth", weights_only=True)
    assert all(torch.isfinite(g).all() for g in raw["gradients"].values())
    assert 0 < len(raw["steps"]) < 4  # the first (overflowed) step was left out
    basis = torch.load(save / "grad_ToyColor.pth", weights_only=True)["basis"]
    assert all(torch.isfinite(b).all() and b.shape[0] > 0 for b in basis.values())
