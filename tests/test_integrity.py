"""A file mtil wrote with bytes changed on disk is never used: a resume falls back (tests/test_last_good_checkpoint),
a re-run of a finished run names its damaged task checkpoint, ``--load`` / ``--model`` refuse damaged or
non-finite weights, a feature-cache entry is computed again, an OGD basis or IMO adapter file is one line. Every
refusal is one line with exit 2 and writes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtil.adapters.feature_cache import FeatureStore
from mtil.main import main
from mtil.methods.ogd import load_basis, save_basis
from mtil.models.clip_loading import load_clip
from mtil.models.imo_adapter import add_imo_adapters, read_imo_file, save_imo_adapters
from mtil.errors import UserError
from mtil.tensor_files import load_tensors, save_tensors
from tests.damage import KINDS, damage, overwrite_in_place

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--workers", "0", "--device", "cpu"]
RUN = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "3"]
EVAL = ["--max-evaluation-size", "16", "--workers", "0", "--device", "cpu", "--eval-only", "--eval-datasets",
        "ToyShape"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("finished") / "run"
    assert main([*RUN, "--save", str(save)]) == 0
    return save


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_rerunning_a_finished_run_verifies_its_task_checkpoints(finished, tmp_path, capsys):
    save = tmp_path / "run"
    save.mkdir()
    for name, data in _files(finished).items():
        (save / name).write_bytes(data)
    assert main([*RUN, "--save", str(save)]) == 0  # intact: nothing to resume
    assert "nothing to resume" in capsys.readouterr().out
    overwrite_in_place(save / "ToyShape.pth", nbytes=64)
    before = _files(save)
    assert main([*RUN, "--save", str(save)]) == 2
    line = _one_line_error(capsys)
    assert "ToyShape.pth is damaged" in line and "does not match its checksum" in line and "task 1" in line
    assert _files(save) == before


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_load_is_one_line(kind, finished, tmp_path, capsys):
    path = tmp_path / "ToyColor.pth"
    path.write_bytes((finished / "ToyColor.pth").read_bytes())
    damage(path, kind)
    assert main([*EVAL, "--load", str(path)]) == 2
    assert str(path) in _one_line_error(capsys)


def test_a_damaged_model_file_is_one_line(finished, tmp_path, capsys):
    path = tmp_path / "model.pth"
    path.write_bytes((finished / "ToyColor.pth").read_bytes())
    overwrite_in_place(path, nbytes=64)
    assert main([*EVAL, "--model", str(path)]) == 2
    assert f"{path} is damaged" in _one_line_error(capsys)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e30])
def test_weights_that_are_not_finite_are_refused_before_use(value, finished, tmp_path, capsys):
    payload = load_tensors(finished / "ToyColor.pth")
    payload["model"]["visual.proj"][0, 0] = value
    path = tmp_path / "bad.pth"
    save_tensors(payload, path)  # intact file, bad weights
    assert main([*EVAL, "--load", str(path)]) == 2
    line = _one_line_error(capsys)
    assert "visual.proj" in line and ("not finite" in line or "exploded" in line)


@pytest.mark.parametrize("depth", [0, 6])  # a long cache path once cut the warning short (CI, /check/...)
def test_a_changed_feature_cache_entry_is_computed_again(tmp_path, capsys, depth):
    model = load_clip("micro-vit", seed=0).model
    store = FeatureStore(tmp_path.joinpath(*["a-rather-long-folder-name"] * depth) / "fc")
    features, labels = torch.randn(64, 64), torch.arange(64)
    store.save(model, 0, {"d": 1}, features, labels)
    path = store.path(model, 0, {"d": 1})
    overwrite_in_place(path, nbytes=8)
    torch.load(path, weights_only=True)  # still loads: only the checksum tells
    assert store.load(model, 0, {"d": 1}) is None and store.damaged == 1
    err = capsys.readouterr().err
    assert "does not match its checksum" in err and "computed again" in err and str(path) in err


def test_a_damaged_ogd_basis_and_imo_adapter_are_one_line(tmp_path):
    basis = tmp_path / "basis.pth"
    save_basis(basis, {"w": torch.eye(4)[:2]}, ["ToyShape"], 0.9)
    assert load_basis(basis)[1] == ["ToyShape"]
    overwrite_in_place(basis, nbytes=4)
    with pytest.raises(UserError, match=f"OGD basis {basis} is damaged"):
        load_basis(basis)
    model = load_clip("micro-vit", seed=0).model
    add_imo_adapters(model)
    adapter = save_imo_adapters(model, tmp_path / "imo.pt")
    assert read_imo_file(adapter)[0]
    overwrite_in_place(adapter, nbytes=4)
    with pytest.raises(UserError, match=f"IMO adapter file {adapter} is damaged"):
        read_imo_file(adapter)


def test_an_imo_adapter_that_is_not_finite_is_refused(tmp_path):
    model = load_clip("micro-vit", seed=0).model
    add_imo_adapters(model)
    path = save_imo_adapters(model, tmp_path / "imo.pt")
    payload = load_tensors(path)
    first = sorted(payload["tensors"])[0]
    payload["tensors"][first][..., 0] = float("nan")
    save_tensors(payload, path)  # an intact file holding a NaN
    with pytest.raises(UserError, match=f"cannot use IMO adapter file {path}: weight {first} is not finite"):
        read_imo_file(path)
