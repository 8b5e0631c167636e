"""TorchScript archives (OpenAI's released CLIP files) are read as data: their tensors come back exactly, and code
planted in an archive (a ``__setstate__`` that writes a file, which ``torch.jit.load`` runs) never runs on any entry
point that reads weights."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from mtil.errors import UserError
from mtil.main import main
from mtil.models.architectures import TINY_ARCHITECTURES
from mtil.models.clip_loading import build_clip, load_clip, read_weights_file, weights_file_for
from mtil.models.torchscript_weights import NotTorchScript, is_torchscript_archive, read_torchscript_tensors

FAST = ["--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1", "--max-evaluation-size", "16", "--workers", "0",
        "--device", "cpu", "--train-dataset", "ToyColor", "--iterations", "1"]


def _traced_clip(path: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny CLIP saved the way OpenAI's files are: traced TorchScript."""
    model = build_clip(TINY_ARCHITECTURES["micro-vit"], seed=seed).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; OpenAI's files are still TorchScript
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.long)),
                                 check_trace=False)
        torch.jit.save(traced, str(path))
    return model


class _WritesAFile(torch.nn.Module):
    """Runs ``torch.from_file(target, shared=True)`` when loaded by ``torch.jit.load``: creates the file."""

    def __init__(self, target: str):
        super().__init__()
        self.text_projection = torch.nn.Parameter(torch.zeros(4, 4))
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.text_projection

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.text_projection, self.target, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        written = torch.from_file(state[1], True, 8)  # used below: TorchScript drops a call whose result is unused
        self.text_projection = state[0] + written[0] * 0
        self.target = state[1]
        self.training = state[2]


def _planted(tmp_path: Path, name: str = "planted.pt") -> tuple[Path, Path]:
    target = tmp_path / "written-by-the-archive"
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_WritesAFile(str(target))), str(path))
    return path, target


def test_a_traced_clips_tensors_are_read_exactly(tmp_path):
    path = tmp_path / "ViT-micro.pt"
    model = _traced_clip(path)
    assert is_torchscript_archive(path)
    tensors = read_torchscript_tensors(path)
    expected = model.state_dict()
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    loaded = load_clip(str(path)).model.eval()
    text = torch.randint(1, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(text), model.encode_text(text))


def test_the_planted_archive_does_write_its_file_under_torch_jit_load(tmp_path):
    """The planted archive is real: torch.jit.load runs its code (which is why mtil never calls it)."""
    path, target = _planted(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path))
    assert target.exists()


def test_reading_the_planted_archive_runs_nothing(tmp_path):
    path, target = _planted(tmp_path)
    with pytest.raises(UserError, match="cannot read .*planted.pt"):
        read_weights_file(path)
    assert not target.exists()


@pytest.mark.parametrize("entry", ["--load", "--model", "--ref-model", "--clip-root"])
def test_no_entry_point_runs_the_planted_code(tmp_path, entry, capsys):
    if entry == "--clip-root":  # the file an OpenAI name resolves to
        root = tmp_path / "clip"
        root.mkdir()
        path, target = _planted(tmp_path, "unused.pt")
        path.rename(weights_file_for("ViT-B/32", root))
        argv = ["--model", "ViT-B/32", "--clip-root", str(root), *FAST]
    else:
        path, target = _planted(tmp_path)
        argv = {"--load": ["--model", "micro-vit", "--load", str(path)],
                "--model": ["--model", str(path)],
                "--ref-model": ["--model", "micro-vit", "--method", "ZSCL", "--ref-model", str(path),
                                "--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions"]}[entry] + FAST
    assert main([*argv, "--save", str(tmp_path / "run")]) == 2
    assert not target.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]


def test_damaged_and_foreign_archives_are_refused_in_one_line(tmp_path):
    path = tmp_path / "ViT-micro.pt"
    _traced_clip(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.pt is damaged: not a complete zip archive"):
        read_weights_file(truncated)
    with pytest.raises(NotTorchScript):
        read_torchscript_tensors(tmp_path / "absent.pt")
    assert not is_torchscript_archive(truncated)
