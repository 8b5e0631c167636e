"""The open_clip back-end: mtil's tiny configurations, offline weight lookup, checkpoint records, per-model facts."""
from __future__ import annotations

import copy
import json
import math
import urllib.request

import pytest
import torch
import torch.nn.functional as F

from mtil.errors import UserError
from mtil.models import open_clip_backend as ob

TINY_VIT = "open_clip:mtil-tiny-vit"
TINY_SIGLIP = "open_clip:mtil-tiny-siglip"
LAION = "open_clip:ViT-B-16/laion2b_s34b_b88k"
LAION_REPO = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
TEXTS = ["a photo of a dog.", "a red square", "zzz", "a very long caption " * 10]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network: the Hugging Face cache is an empty folder of this test, and any download attempt fails the
    test (open_clip's create_model would try one; mtil must never call it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    oc = ob._open_clip()

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args} {kwargs}")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(oc.pretrained, "hf_hub_download", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def _inputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    side = ob.image_resolution(model)
    return torch.randn(3, 3, side, side, generator=generator), ob.tokenize(model, TEXTS)


def _mtil_logits(model, images, tokens):
    """Zero-shot logits as mtil computes them: normalised features, exp(scale) * cosine, + SigLIP's bias."""
    with torch.no_grad():
        f = F.normalize(model.encode_image(images), dim=-1)
        t = F.normalize(ob.encode_text(model, tokens), dim=-1)
        logits = model.logit_scale.exp() * f @ t.T
        bias = ob.logit_bias(model)
        return logits + bias if bias is not None else logits


@pytest.fixture
def tiny_config_as_vit_b_16(monkeypatch):
    """open_clip's ViT-B-16 built as mtil's tiny ViT (its pretrained tags, hub ids and file names stay real)."""
    from open_clip import factory

    tiny = json.loads((ob.ASSETS / "mtil-tiny-vit.json").read_text())
    monkeypatch.setitem(factory._MODEL_CONFIGS, "ViT-B-16", tiny)
    return tiny


def _save_safetensors(model, path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


# --------------------------------------------------------------------------------------------------------------- #
# tiny models
# --------------------------------------------------------------------------------------------------------------- #
def test_tiny_models_build_with_their_properties(tmp_path):
    from open_clip.model import CLIP, CustomTextCLIP

    vit, vit_spec = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=0)
    siglip, siglip_spec = ob.build_open_clip(TINY_SIGLIP, clip_root=tmp_path, seed=0)
    assert type(vit) is CLIP and type(siglip) is CustomTextCLIP
    for model, spec in ((vit, vit_spec), (siglip, siglip_spec)):
        assert not model.training
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert ob.image_resolution(model) == 32 and ob.embed_dim(model) == 64 and model.context_length == 24
        assert spec.pretrained is None and spec.backend == "open_clip"
    assert not ob.uses_sigmoid_loss(vit) and ob.logit_bias(vit) is None
    assert ob.uses_sigmoid_loss(siglip) and ob.logit_bias(siglip).item() == -10.0
    assert math.isclose(siglip.logit_scale.exp().item(), 10.0, rel_tol=1e-5)
    assert math.isclose(vit.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    assert ob.preprocess(vit) == (ob.OPENAI_MEAN, ob.OPENAI_STD, "bicubic")
    assert ob.preprocess(siglip) == ((0.5,) * 3, (0.5,) * 3, "bicubic") and ob.resize_mode(siglip) == "squash"


def test_seed_fixes_the_random_weights(tmp_path):
    a, _ = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=1)
    b, _ = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=1)
    c, _ = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.visual.proj, c.visual.proj)


def test_tiny_vit_is_clip_anytorchs_tiny_vit(tmp_path):
    """Same parameter names and shapes as clip-anytorch's tiny-vit, and the same outputs from the same weights:
    the two back-ends run one architecture (what the side-by-side benchmark compares)."""
    from clip import clip as clip_api

    from mtil.models.clip_loading import load_clip

    reference = load_clip("tiny-vit", seed=0).model.eval()
    model, _ = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=5)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    model.load_state_dict(reference.state_dict())
    images, tokens = _inputs(model)
    assert torch.equal(tokens, clip_api.tokenize(TEXTS, context_length=24, truncate=True))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), reference.encode_image(images), atol=1e-6)
        assert torch.allclose(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-6)


@pytest.mark.parametrize("name", [TINY_VIT, TINY_SIGLIP])
def test_zero_shot_logits_equal_open_clips_forward(name, tmp_path):
    model, _ = ob.build_open_clip(name, clip_root=tmp_path, seed=0)
    with torch.no_grad():  # a visible scale: the random model's features are nearly parallel
        model.logit_scale.fill_(math.log(50.0))
    images, tokens = _inputs(model)
    ours = _mtil_logits(model, images, tokens)
    with torch.no_grad():
        image_features, text_features, scale, *bias = model(images, tokens)
        theirs = scale * image_features @ text_features.T + (bias[0] if bias else 0)
        get_logits = model.get_logits(images, tokens)[0]
    assert ours.shape == (3, len(TEXTS))
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert torch.allclose(ours, get_logits, atol=1e-5, rtol=0)
    assert ours.std() > 1e-3  # not a constant matrix that any computation would match


def test_tokenize_truncates_to_the_context_length(tmp_path):
    model, _ = ob.build_open_clip(TINY_SIGLIP, clip_root=tmp_path, seed=0)
    tokens = ob.tokenize(model, TEXTS)
    assert tokens.dtype == torch.long and tokens.shape == (len(TEXTS), 24)
    assert int(tokens[3, -1]) == 49407  # the long caption keeps its end-of-text token
    assert int(tokens[2, 0]) == 49406 and int(tokens[2, -1]) == 0


# --------------------------------------------------------------------------------------------------------------- #
# padding
# --------------------------------------------------------------------------------------------------------------- #
def test_pads_freely_and_trimming(tmp_path):
    from mtil.models.text import trim_padding

    vit, _ = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=0)
    siglip, _ = ob.build_open_clip(TINY_SIGLIP, clip_root=tmp_path, seed=0)
    assert ob.pads_freely(vit) is True and ob.pads_freely(siglip) is False
    short = ["a cat", "a red square"]
    for model in (vit, siglip):
        full = ob.tokenize(model, short)
        trimmed = trim_padding(full)
        assert trimmed.shape[1] < full.shape[1]
        with torch.no_grad():
            expected = model.encode_text(full)
            assert torch.allclose(ob.encode_text(model, trimmed), expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # why SigLIP must keep its padding: it pools the last position, padding included
        cut = siglip.encode_text(trim_padding(ob.tokenize(siglip, short)))
        assert not torch.allclose(cut, siglip.encode_text(ob.tokenize(siglip, short)), atol=1e-3)


# --------------------------------------------------------------------------------------------------------------- #
# checkpoint records
# --------------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", [TINY_VIT, TINY_SIGLIP])
def test_spec_round_trips_through_a_weights_only_file(name, tmp_path):
    model, spec = ob.build_open_clip(name, clip_root=tmp_path, seed=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"open_clip": spec.to_dict(), "model": model.state_dict()}, path)
    record = torch.load(path, weights_only=True)
    assert ob.OpenClipSpec.from_dict(record["open_clip"]) == spec
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    rebuilt = ob.model_from_spec(record["open_clip"], record["model"])
    assert torch.equal(torch.rand(1), before)  # rebuilding leaves the random state alone (exact resume)
    assert not rebuilt.training and ob.preprocess(rebuilt) == ob.preprocess(model)
    images, tokens = _inputs(model)
    assert torch.equal(ob.tokenize(rebuilt, TEXTS), tokens)
    assert torch.equal(_mtil_logits(rebuilt, images, tokens), _mtil_logits(model, images, tokens))


def _damaged_records(spec: dict, state: dict):
    wrong_backend = {**spec, "backend": "clip"}
    bigger = copy.deepcopy(spec)
    bigger["config"]["vision_cfg"]["width"] = 2 ** 20  # a flipped size: refused before anything is allocated
    no_config = {k: v for k, v in spec.items() if k != "config"}
    bad_mean = copy.deepcopy(spec)
    bad_mean["preprocess"]["mean"] = [0.5, float("nan"), 0.5]
    tensor_in_config = copy.deepcopy(spec)
    tensor_in_config["config"]["embed_dim"] = torch.tensor(64)
    missing = {k: v for k, v in state.items() if k != "visual.proj"}
    not_tensor = {**state, "visual.proj": [1.0]}
    nan = {**state, "visual.proj": torch.full_like(state["visual.proj"], float("nan"))}
    return [
        ("not a dict", state, "not a dict"), (wrong_backend, state, "back-end"), (no_config, state, "'config'"),
        (bigger, state, "do not fit"), (bad_mean, state, "mean"), (tensor_in_config, state, "plain values"),
        (spec, missing, "1 missing"), (spec, not_tensor, "not a tensor"), (spec, nan, "not finite"),
    ]


def test_damaged_or_mismatched_records_are_refused_in_one_line(tmp_path):
    model, spec = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=0)
    for record, state, words in _damaged_records(spec.to_dict(), model.state_dict()):
        with pytest.raises(UserError) as exc:
            ob.model_from_spec(record, state)
        assert words in _one_line(exc)


# --------------------------------------------------------------------------------------------------------------- #
# weights of real architectures, offline
# --------------------------------------------------------------------------------------------------------------- #
def test_missing_weights_name_every_place_looked(tmp_path):
    clip_root = tmp_path / "clip"
    with pytest.raises(UserError) as exc:
        ob.build_open_clip(LAION, clip_root=clip_root)
    message = _one_line(exc)
    folder = clip_root / "open_clip" / LAION_REPO
    assert "ViT-B-16/laion2b_s34b_b88k are missing" in message
    assert str(folder / "open_clip_model.safetensors") in message
    assert str(folder / "open_clip_pytorch_model.bin") in message
    assert f"Hugging Face cache {tmp_path / 'hf-hub'}" in message and LAION_REPO in message
    assert f"hf download {LAION_REPO} open_clip_model.safetensors --local-dir {folder}" in message


def test_openai_tag_also_looks_for_clip_anytorchs_file(tmp_path):
    with pytest.raises(UserError) as exc:
        ob.build_open_clip("open_clip:ViT-B-16/openai", clip_root=tmp_path / "clip")
    assert str(tmp_path / "clip" / "ViT-B-16.pt") in _one_line(exc)


def test_weights_placed_where_the_error_says_are_loaded(tmp_path, tiny_config_as_vit_b_16):
    clip_root = tmp_path / "clip"
    with pytest.raises(UserError):
        ob.build_open_clip(LAION, clip_root=clip_root)
    source, _ = ob.build_open_clip(TINY_VIT, clip_root=clip_root, seed=7)
    _save_safetensors(source, clip_root / "open_clip" / LAION_REPO / "open_clip_model.safetensors")
    model, spec = ob.build_open_clip(LAION, clip_root=clip_root)
    assert spec.arch == "ViT-B-16" and spec.pretrained == "laion2b_s34b_b88k"
    images, tokens = _inputs(model)
    assert torch.equal(_mtil_logits(model, images, tokens), _mtil_logits(source, images, tokens))
    rebuilt = ob.model_from_spec(spec.to_dict(), model.state_dict())  # the record holds the config used
    assert torch.equal(_mtil_logits(rebuilt, images, tokens), _mtil_logits(source, images, tokens))


def test_weights_in_the_hugging_face_cache_are_loaded(tmp_path, tiny_config_as_vit_b_16):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-hub" / ("models--" + LAION_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    source, _ = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=8)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save(source.state_dict(), snapshot / "open_clip_pytorch_model.bin")  # the .bin name, read weights_only
    model, _ = ob.build_open_clip(LAION, clip_root=tmp_path / "empty-clip-root")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_a_tags_quick_gelu_is_honoured(tmp_path, tiny_config_as_vit_b_16):
    """ViT-B-16/openai was trained with QuickGELU: the model is built with it (open_clip would only warn)."""
    tiny_config_as_vit_b_16.pop("quick_gelu")
    source, _ = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=9)
    _save_safetensors(source, tmp_path / "open_clip" / "timm" / "vit_base_patch16_clip_224.openai"
                      / "open_clip_model.safetensors")
    model, spec = ob.build_open_clip("open_clip:ViT-B-16/openai", clip_root=tmp_path)
    assert spec.config["quick_gelu"] is True
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_a_weights_file_given_as_the_tag(tmp_path):
    source, _ = ob.build_open_clip(TINY_VIT, clip_root=tmp_path, seed=4)
    path = tmp_path / "mine.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model, spec = ob.build_open_clip(f"{TINY_VIT}/{path}", clip_root=tmp_path)
    assert spec.pretrained == str(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    with pytest.raises(UserError) as exc:
        ob.build_open_clip(f"{TINY_VIT}/{tmp_path / 'absent.pt'}", clip_root=tmp_path)
    assert "does not exist" in _one_line(exc)


class _Payload:
    """Not a tensor: weights_only loading must refuse a file that holds it (weights are data, not code)."""


def test_weights_files_are_read_as_data_only(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"visual.proj": _Payload()}, path)
    with pytest.raises(UserError) as exc:
        ob.build_open_clip(f"{TINY_VIT}/{path}", clip_root=tmp_path)
    assert "weights_only" in _one_line(exc)


def test_a_real_architecture_needs_a_tag_or_untrained(tmp_path, tiny_config_as_vit_b_16):
    with pytest.raises(UserError) as exc:
        ob.build_open_clip("open_clip:ViT-B-16", clip_root=tmp_path)
    message = _one_line(exc)
    assert "needs pretrained weights" in message and "laion2b_s34b_b88k" in message and "openai" in message
    model, spec = ob.build_open_clip("open_clip:ViT-B-16", clip_root=tmp_path, untrained=True, seed=0)
    assert spec.pretrained is None and ob.image_resolution(model) == 32


# --------------------------------------------------------------------------------------------------------------- #
# names
# --------------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, words", [
    ("open_clip:ViT-B-61", "did you mean ViT-B-16"),
    ("open_clip:mtil-tiny-vitt", "did you mean mtil-tiny-vit"),
    ("open_clip:ViT-B/16", "did you mean open_clip:ViT-B-16?"),
    ("open_clip:ViT-B-16/laion2b_s34b_b8k", "did you mean laion2b_s34b_b88k?"),
    ("open_clip:ViT-B-16/", "nothing after '/'"),
    ("open_clip:mtil-tiny-vit/webli", "no pretrained tag 'webli'"),
    ("open_clip:coca_ViT-B-32", "captioning model"),
])
def test_bad_names_are_refused_in_one_line(name, words, tmp_path):
    with pytest.raises(UserError) as exc:
        ob.build_open_clip(name, clip_root=tmp_path)
    assert words in _one_line(exc)


def test_parse_name():
    assert ob.is_open_clip_name(LAION) and not ob.is_open_clip_name("ViT-B/16")
    assert ob.parse_name(LAION) == ("ViT-B-16", "laion2b_s34b_b88k")
    assert ob.parse_name("open_clip:ViT-B-16/LAION2B-S34B-B88K") == ("ViT-B-16", "laion2b_s34b_b88k")
    assert ob.parse_name("open_clip:ViT-B-16-SigLIP/webli") == ("ViT-B-16-SigLIP", "webli")
    assert ob.parse_name(TINY_SIGLIP) == ("mtil-tiny-siglip", None)
    assert ob.parse_name("open_clip:ViT-B-16//w/x.safetensors") == ("ViT-B-16", "/w/x.safetensors")


# --------------------------------------------------------------------------------------------------------------- #
# where the blocks are
# --------------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, text", [(TINY_VIT, "transformer.resblocks"),
                                        (TINY_SIGLIP, "text.transformer.resblocks")])
def test_block_prefixes_native_towers(name, text, tmp_path):
    model, _ = ob.build_open_clip(name, clip_root=tmp_path, seed=0)
    where = ob.block_prefixes(model)
    assert where == {"visual": "visual.transformer.resblocks", "text": text,
                     "visual_attention": "nn.MultiheadAttention", "text_attention": "nn.MultiheadAttention",
                     "token_layout": "NLD"}
    for key in ("visual", "text"):
        blocks = model.get_submodule(where[key])
        assert len(blocks) == 2 and isinstance(blocks[0].attn, torch.nn.MultiheadAttention)
        assert blocks[0].attn.batch_first
    # OpenAI's parameter names inside a block
    names = {n for n, _ in model.get_submodule(where["visual"])[0].named_parameters()}
    assert {"attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight",
            "ln_1.weight", "ln_2.weight"} <= names


def test_block_prefixes_timm_tower(tmp_path, monkeypatch):
    from open_clip import factory

    config = json.loads((ob.ASSETS / "mtil-tiny-siglip.json").read_text())
    config["vision_cfg"] = {"image_size": 32, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                            "timm_pool": "avg", "timm_proj": "linear"}
    monkeypatch.setitem(factory._MODEL_CONFIGS, "ViT-B-16-SigLIP", config)
    model, _ = ob.build_open_clip("open_clip:ViT-B-16-SigLIP", clip_root=tmp_path, untrained=True, seed=0)
    where = ob.block_prefixes(model)
    assert where["visual"] == "visual.trunk.blocks" and where["visual_attention"].startswith("timm.")
    assert hasattr(model.get_submodule(where["visual"])[0].attn, "qkv")
    assert where["text"] == "text.transformer.resblocks" and ob.image_resolution(model) == 32
