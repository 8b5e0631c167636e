"""Building and loading CLIP models: architectures, weight file formats, and the errors users see."""
from __future__ import annotations

import os
import urllib.error
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from clip.model import CLIP

from mtil.errors import UserError
from mtil.models import clip_loading
from mtil.models.architectures import (
    OPENAI_ARCHITECTURES,
    TINY_ARCHITECTURES,
    Architecture,
    architecture_from_state_dict,
)
from mtil.models.clip_loading import load_clip


def _assert_same_outputs(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- #
# architectures
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_tiny_architecture_builds_and_is_recognised(name):
    arch = TINY_ARCHITECTURES[name]
    loaded = load_clip(name, seed=0)
    assert isinstance(loaded.model, CLIP)
    assert loaded.arch == arch
    assert architecture_from_state_dict(loaded.model.state_dict()) == arch
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.visual.input_resolution == arch.image_resolution
    assert loaded.model.context_length == arch.context_length
    # It runs: one image and one sentence give embed_dim features.
    from mtil.models.text import tokenize

    loaded.model.eval()
    with torch.no_grad():
        image = loaded.model.encode_image(torch.zeros(1, 3, arch.image_resolution, arch.image_resolution))
        text = loaded.model.encode_text(tokenize(loaded.model, ["a photo of a dog."]))
    assert image.shape == text.shape == (1, arch.embed_dim)


@pytest.mark.parametrize("name", sorted(OPENAI_ARCHITECTURES))
def test_openai_architecture_inferred_from_shapes(name):
    """Every OpenAI table entry survives build -> state dict -> inference (on the meta device: no memory)."""
    arch = OPENAI_ARCHITECTURES[name]
    with torch.device("meta"):
        model = CLIP(**asdict(arch))
    assert architecture_from_state_dict(model.state_dict()) == arch


def test_tiny_seed_is_reproducible_and_matters():
    a = load_clip("micro-vit", seed=0).model.state_dict()
    b = load_clip("micro-vit", seed=0).model.state_dict()
    c = load_clip("micro-vit", seed=1).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_architecture_dict_round_trip():
    for arch in [*TINY_ARCHITECTURES.values(), *OPENAI_ARCHITECTURES.values()]:
        assert Architecture.from_dict(arch.to_dict()) == arch


def test_untrained_real_name_builds_without_weights(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(clip_loading.clip_api, "_download", lambda *a, **k: calls.append(a))
    loaded = load_clip("ViT-B/32", untrained=True, clip_root=tmp_path / "clip", seed=0)
    assert calls == []  # nothing fetched
    assert not (tmp_path / "clip").exists()
    arch = OPENAI_ARCHITECTURES["ViT-B/32"]
    assert loaded.arch == arch
    sd = loaded.model.state_dict()
    assert architecture_from_state_dict(sd) == arch
    assert sd["visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert sd["visual.positional_embedding"].shape == ((224 // 32) ** 2 + 1, 768)
    assert sd["visual.proj"].shape == (768, 512)
    assert sd["text_projection"].shape == (512, 512)
    assert sd["positional_embedding"].shape == (77, 512)
    assert sd["token_embedding.weight"].shape == (49408, 512)
    assert len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}) == 12
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())


# --------------------------------------------------------------------------- #
# weight file formats
# --------------------------------------------------------------------------- #
def test_openai_style_state_dict_file(tmp_path, micro, outputs_of):
    sd = dict(micro.model.state_dict())
    # OpenAI files also hold these three non-parameter entries.
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai_style.pt"
    torch.save(sd, path)
    for loaded in (load_clip(str(path)), load_clip("micro-vit", load=str(path))):
        assert loaded.arch == micro.arch
        assert str(path) in loaded.source
        _assert_same_outputs(outputs_of(loaded.model), outputs_of(micro.model))


def test_half_precision_file_loads_as_float32(tmp_path, micro, outputs_of):
    """OpenAI's weights are fp16: they load into a float32 model holding exactly the rounded values."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in micro.model.state_dict().items()}
    path = tmp_path / "half.pt"
    torch.save(half, path)
    loaded = load_clip(str(path))
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    reference = clip_loading.build_clip(micro.arch)
    reference.load_state_dict({k: v.float() for k, v in half.items()})
    _assert_same_outputs(outputs_of(loaded.model), outputs_of(reference))


def test_zscl_checkpoint_with_module_prefix(tmp_path, micro, outputs_of):
    sd = {f"module.{k}": v for k, v in micro.model.state_dict().items()}
    path = tmp_path / "zscl.pth"
    torch.save({"state_dict": sd}, path)
    for loaded in (load_clip(str(path)), load_clip("ViT-B/16", load=str(path))):
        assert loaded.arch == micro.arch
        _assert_same_outputs(outputs_of(loaded.model), outputs_of(micro.model))


@pytest.mark.parametrize("name", ["micro-vit", "tiny-rn"])
def test_mtil_checkpoint(tmp_path, name, outputs_of):
    original = load_clip(name, seed=3)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "mtil-checkpoint", "arch": original.arch.to_dict(), "model": original.model.state_dict(),
                "iteration": 7}, path)
    expected = original.model.state_dict()
    for loaded in (load_clip(str(path)), load_clip("micro-vit", load=str(path))):
        assert loaded.checkpoint["iteration"] == 7
        assert loaded.checkpoint["format"] == "mtil-checkpoint"
        assert "model" not in loaded.checkpoint
        assert loaded.arch == original.arch
        got = loaded.model.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        if name == "micro-vit":  # (the ResNet's forward is slow on a busy CPU; the weights say enough)
            _assert_same_outputs(outputs_of(loaded.model), outputs_of(original.model))


def test_torchscript_archive(tmp_path, micro, probe_inputs, outputs_of):
    """OpenAI's released files are TorchScript archives of the whole model."""
    images, tokens = probe_inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values in CLIP's forward
        traced = torch.jit.trace(micro.model, (images, tokens), check_trace=False)
        path = tmp_path / "scripted.pt"
        torch.jit.save(traced, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load's "looks like a TorchScript archive" notice
        loaded = load_clip(str(path))
    assert loaded.arch == micro.arch
    _assert_same_outputs(outputs_of(loaded.model), outputs_of(micro.model))


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
def test_missing_openai_weights_name_the_file_and_url(tmp_path, monkeypatch):
    seen = []

    def fail(url, root, *args, **kwargs):
        seen.append((url, root))
        Path(root).mkdir(parents=True, exist_ok=True)
        Path(root, os.path.basename(url)).write_bytes(b"")  # a failed download can leave an empty file
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(clip_loading.clip_api, "_download", fail)
    root = tmp_path / "clip-root"
    with pytest.raises(UserError) as info:
        load_clip("ViT-B/16", clip_root=root)
    message = str(info.value)
    url = clip_loading.clip_api._MODELS["ViT-B/16"]
    target = root / os.path.basename(url)
    assert seen == [(url, str(root))]
    assert str(target) in message
    assert url in message
    assert "URLError" in message
    assert "\n" not in message
    assert not target.exists(), "the empty partial download must be removed"


def test_existing_weights_file_is_not_downloaded_again(tmp_path, monkeypatch, micro, outputs_of):
    calls = []
    monkeypatch.setattr(clip_loading.clip_api, "_download", lambda *a, **k: calls.append(a))
    target = clip_loading.weights_file_for("ViT-B/32", tmp_path)
    torch.save(micro.model.state_dict(), target)
    loaded = load_clip("ViT-B/32", clip_root=tmp_path)
    assert calls == []
    assert str(target) in loaded.source
    _assert_same_outputs(outputs_of(loaded.model), outputs_of(micro.model))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # mtil's TorchScript fallback
def test_garbage_file_is_a_user_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint\x00\x01\x02" * 50)
    with pytest.raises(UserError, match="cannot read") as info:
        load_clip(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(UserError, match="cannot read"):
        load_clip("micro-vit", load=str(path))


def test_torch_file_without_clip_weights_is_a_user_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="text_projection"):
        load_clip(str(path))
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(UserError, match="list"):
        load_clip(str(listed))


def test_missing_load_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError) as info:
        load_clip("micro-vit", load=str(missing))
    assert str(missing) in str(info.value)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError) as info:
        load_clip("ViT-B/99")
    message = str(info.value)
    assert "ViT-B/99" in message
    for name in clip_loading.model_names():
        assert name in message
    assert set(clip_loading.model_names()) == set(OPENAI_ARCHITECTURES) | set(TINY_ARCHITECTURES) | {"toyclip"}


def test_resolve_device():
    assert clip_loading.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert clip_loading.resolve_device("auto").type == expected
    with pytest.raises(UserError, match="bogus"):
        clip_loading.resolve_device("bogus")


def test_checkpoint_with_wrong_arch_is_a_user_error(tmp_path, micro):
    path = tmp_path / "mismatch.pt"
    torch.save({"format": "mtil-checkpoint", "arch": TINY_ARCHITECTURES["tiny-vit"].to_dict(),
                "model": micro.model.state_dict(), "iteration": 1}, path)
    with pytest.raises(UserError):
        load_clip(str(path))


def test_incomplete_state_dict_is_a_user_error(tmp_path, micro):
    sd = {k: v for k, v in micro.model.state_dict().items() if not k.startswith("visual.")}
    path = tmp_path / "text_only.pt"
    torch.save(sd, path)
    with pytest.raises(UserError):
        load_clip(str(path))
