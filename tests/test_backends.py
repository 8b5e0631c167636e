"""The model back-end seam: the same weights through clip-anytorch and through open_clip give the same model, the
same runs and the same matrices; open_clip runs record their back-end, resume exactly and evaluate from their
checkpoints; SigLIP's bias and loss are where SigLIP puts them.

``open_clip:mtil-tiny-vit/toyclip`` is toyclip's architecture, parameter names and weights in open_clip's classes,
so every comparison here is against the clip-anytorch run of ``toyclip``.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mtil.datasets.registry import open_dataset
from mtil.evaluation import matrix as mx
from mtil.main import main
from mtil.methods.contrastive import sigmoid_loss
from mtil.models import backend
from mtil.models.clip_loading import load_clip
from mtil.models.heads import LinearHead
from mtil.models.lora import LoraSettings, inject_lora, merge_lora
from mtil.models.text import encode_texts, trim_padding, zeroshot_head
from tests.helpers import load, run_killed_at

OPEN_TOYCLIP = "open_clip:mtil-tiny-vit/toyclip"
FAST = ["--train-dataset", "ToyColorB", "--eval-datasets", "ToyColorB,ToyColorA", "--iterations", "4",
        "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1", "--max-evaluation-size", "40",
        "--batch-size-eval", "40", "--workers", "0", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def pair():
    return load_clip("toyclip").model.eval(), load_clip(OPEN_TOYCLIP).model.eval()


def test_the_same_weights_are_the_same_model_through_either_backend(pair):
    clip_model, open_model = pair
    assert backend.backend_name(clip_model) == "clip" and backend.backend_name(open_model) == "open_clip"
    assert backend.image_spec(clip_model) == backend.image_spec(open_model)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(clip_model.encode_image(images), open_model.encode_image(images))
    data = open_dataset("ToyColorB")
    texts = [t.format(c) for c in data.classnames for t in data.templates]
    assert torch.equal(encode_texts(clip_model, texts), encode_texts(open_model, texts))  # trimmed padding both
    assert torch.equal(zeroshot_head(clip_model, data.classnames, data.templates),
                       zeroshot_head(open_model, data.classnames, data.templates))


def test_trimmed_tokens_give_open_clips_own_full_length_features(pair):
    _, model = pair
    tokens = backend.raw_tokens(model, ["a red square", "a photo of a small blue circle on grass"])
    with torch.no_grad():
        full = model.encode_text(tokens)  # open_clip's own, at the full context length
        trimmed = backend.encode_text(model, trim_padding(tokens))
    assert trim_padding(tokens).shape[1] < tokens.shape[1]
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)


def test_a_fresh_lora_changes_no_output_of_an_open_clip_model(pair):
    _, reference = pair
    model = load_clip(OPEN_TOYCLIP).model.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = backend.raw_tokens(model, ["a red square", "a blue circle"])
    # PyTorch picks the kernel of open_clip's batch-first attention by whether its weights require grad (a 5e-7
    # difference): compare outputs with the same setting, as here, to see what the adapters alone change
    model.requires_grad_(False)
    with torch.no_grad():
        before = (model.encode_image(images), model.encode_text(tokens))
    inject_lora(model, LoraSettings(r=4, targets=("attn", "mlp.c_fc")), seed=0)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    model.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), before[0]) and torch.equal(model.encode_text(tokens), before[1])
    with torch.no_grad():  # a trained adapter changes the output, and merging keeps that output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        adapted = model.encode_image(images)
    assert not torch.allclose(adapted, before[0])
    merge_lora(model)
    assert set(model.state_dict()) == set(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["--lora"], ["--method", "ast", "--shots", "4"],
                                   ["--method", "ZSCL", "--ref-dataset", "ToyShape", "--ref-sentences", "random",
                                    "--we", "--l2", "1"]], ids=["finetune", "lora", "ast", "zscl+we+l2"])
def test_a_run_gives_the_same_matrix_and_weights_through_either_backend(extra, tmp_path):
    runs = {}
    for model in ("toyclip", OPEN_TOYCLIP):
        save = tmp_path / model.replace(":", "_").replace("/", "_")
        assert main(["--model", model, *FAST, *extra, "--save", str(save)]) == 0
        runs[model] = (mx.matrix_from_results(save / "results.jsonl")[0], load(save / "ToyColorB.pth")["model"])
    (clip_cells, clip_weights), (open_cells, open_weights) = runs.values()
    assert list(clip_cells["top1"]) == list(open_cells["top1"])
    assert clip_weights.keys() == open_weights.keys()
    start = load_clip("toyclip").model.state_dict()
    assert any(not torch.equal(clip_weights[k], start[k]) for k in start)  # the run trained something
    for key, value in clip_weights.items():  # the same up to the attention kernels' rounding
        other = open_weights[key]
        if key.endswith("attn.in_proj_bias"):
            # the key bias adds the same q.b_k to every score of a row, which softmax ignores: its gradient is
            # rounding noise, which AdamW scales to lr-sized steps of random sign in either back-end. Not compared.
            value, other = torch.cat([value.chunk(3)[0], value.chunk(3)[2]]), torch.cat([other.chunk(3)[0],
                                                                                        other.chunk(3)[2]])
        assert torch.allclose(other, value, rtol=1e-4, atol=1e-5), (key, (other - value).abs().max())


def test_tip_adapter_gives_the_same_matrix_through_either_backend(tmp_path):
    cells = []
    for model in ("toyclip", OPEN_TOYCLIP):
        save = tmp_path / model.replace(":", "_").replace("/", "_")
        assert main(["--model", model, "--method", "tip-adapter-f", "--tip-epochs", "2", "--train-dataset",
                     "ToyColorB", "--shots", "4", "--max-evaluation-size", "40", "--batch-size-eval", "40",
                     "--workers", "0", "--device", "cpu", "--threads", "1", "--save", str(save)]) == 0
        cells.append(list(mx.matrix_from_results(save / "results.jsonl")[0]["top1"]))
    assert cells[0] == cells[1] and len(cells[0]) == 2


def test_an_open_clip_run_records_its_backend_resumes_exactly_and_evaluates_from_its_checkpoint(
        tmp_path, monkeypatch, capsys):
    command = ["--model", "open_clip:mtil-tiny-vit", *FAST, "--train-dataset", "ToyColorB,ToyColorA",
               "--checkpoint-interval", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*command, "--save", str(straight)]) == 0
    record = load(straight / "ToyColorA.pth")["arch"]
    assert record["backend"] == "open_clip" and record["arch"] == "mtil-tiny-vit"
    run_killed_at(monkeypatch, [*command, "--save", str(resumed)], ["ToyColorB"], 3)
    assert main([*command, "--save", str(resumed)]) == 0
    assert "resuming ToyColorA at step 2/4" in capsys.readouterr().out
    a, b = load(straight / "ToyColorA.pth")["model"], load(resumed / "ToyColorA.pth")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert mx.matrix_from_results(straight / "results.jsonl")[0].equals(
        mx.matrix_from_results(resumed / "results.jsonl")[0])
    evaluated = tmp_path / "eval"
    assert main(["--load", str(straight / "ToyColorA.pth"), "--eval-only", "--eval-datasets", "ToyColorA",
                 "--max-evaluation-size", "40", "--batch-size-eval", "40", "--workers", "0", "--device", "cpu",
                 "--save", str(evaluated)]) == 0
    row = json.loads((evaluated / "results.jsonl").read_text().splitlines()[0])
    last = mx.matrix_from_results(straight / "results.jsonl")[0]
    assert row["top1"] == pytest.approx(float(last[last["dataset"] == "ToyColorA"]["top1"].iloc[-1]))
    assert row["config"]["model"] == "open_clip:mtil-tiny-vit"


def test_a_clip_name_beside_an_open_clip_checkpoint_is_refused(tmp_path, capsys):
    save = tmp_path / "run"
    assert main(["--model", "open_clip:mtil-tiny-vit", *FAST, "--iterations", "1", "--save", str(save)]) == 0
    capsys.readouterr()
    assert main(["--model", "tiny-vit", "--load", str(save / "ToyColorB.pth"), "--eval-only",
                 "--eval-datasets", "ToyColorB", "--workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "open_clip:mtil-tiny-vit model, not --model tiny-vit" in err


def test_siglip_heads_hold_its_bias_and_its_loss_is_open_clips():
    model = load_clip("open_clip:mtil-tiny-siglip", seed=0).model.eval()
    assert backend.uses_sigmoid_loss(model) and not backend.pads_freely(model)
    bias = backend.logit_bias(model)
    assert bias is not None and float(bias.detach()) == pytest.approx(-10.0)
    data = open_dataset("ToyColorB")
    head = LinearHead.from_zeroshot(model, data.classnames, data.templates[:1])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = backend.raw_tokens(model, [data.templates[0].format(c) for c in data.classnames])
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(images), dim=-1)
        own = model.get_logits(images, tokens)[0]  # open_clip's: scale * cos + bias
        torch.testing.assert_close(head(image_features), own, rtol=1e-5, atol=1e-5)
    from open_clip.loss import SigLipLoss

    text_features = F.normalize(torch.randn(3, image_features.shape[1]), dim=-1)
    scale, b = model.logit_scale.exp(), model.logit_bias
    with torch.no_grad():
        theirs = SigLipLoss()(image_features, text_features, scale, b)
        ours = sigmoid_loss(scale * image_features @ text_features.T + b)
    torch.testing.assert_close(ours, theirs)


def test_siglip_fine_tunes_and_evaluates_from_the_command_line(tmp_path):
    save = tmp_path / "run"
    assert main(["--model", "open_clip:mtil-tiny-siglip", *FAST, "--save", str(save)]) == 0
    cells = mx.matrix_from_results(save / "results.jsonl")[0]
    assert len(cells) == 4 and cells["top1"].between(0, 100).all()
    assert main(["--model", "open_clip:mtil-tiny-siglip", "--eval-only", "--eval-datasets", "ToyColorB",
                 "--max-evaluation-size", "40", "--workers", "0", "--device", "cpu"]) == 0


def test_the_imo_adapter_refuses_an_open_clip_model_in_one_line(tmp_path, capsys):
    from mtil.imo import main as imo_main

    assert imo_main(["--model", "open_clip:mtil-tiny-vit", "--data", "ToyShape", "--save", str(tmp_path / "imo"),
                     "--epochs", "1", "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not support open_clip" in err and not (tmp_path / "imo").exists()


def test_each_backend_preprocesses_as_its_model_was_trained():
    from PIL import Image

    from mtil.models.transforms import eval_transform

    siglip = backend.image_spec(load_clip("open_clip:mtil-tiny-siglip", seed=0).model)
    assert (siglip.mean, siglip.std, siglip.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "squash")
    assert backend.image_spec(load_clip(OPEN_TOYCLIP).model) == backend.image_spec(load_clip("toyclip").model)
    wide = Image.new("RGB", (64, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 8, 32))  # a white band at the left edge
    squashed = eval_transform(siglip)(wide)  # SigLIP: the whole image, squashed; CLIP: the center, cropped
    cropped = eval_transform(32)(wide)
    assert squashed.shape == cropped.shape == (3, 32, 32)
    assert squashed[:, :, 0].mean() > 0.9 and cropped[:, :, 0].mean() < -1.5


def test_methods_that_name_parameters_find_siglips_text_tower():
    from mtil.methods.ast import blocks_of
    from mtil.methods.part_lr import clip_part

    model = load_clip("open_clip:mtil-tiny-siglip", seed=0).model
    assert sorted(blocks_of(model)) == ["text.0", "text.1", "visual.0", "visual.1"]  # CLIP-AST: both encoders
    names = [n for n, _ in model.named_parameters()]
    assert {clip_part(n) for n in names if n.startswith("text.text_projection")} == {"proj"}
    assert clip_part("logit_bias") == "proj"
    assert {clip_part(n) for n in names if n.startswith("text.transformer.")} == {"text"}


def test_a_timm_image_tower_takes_lora_by_timms_names_and_clip_ast_refuses_it(tmp_path, monkeypatch):
    """SigLIP's and EVA's released models have timm image towers (``visual.trunk.blocks.N.attn.qkv``): LoRA
    targets them by those names; CLIP-AST, which needs the blocks of both encoders, says why it cannot run."""
    from open_clip import factory

    from mtil.errors import UserError
    from mtil.methods.ast import CLIPAST
    from mtil.models import open_clip_backend as ob
    from mtil.models.lora import resolve_targets

    ob._open_clip()  # registers mtil's configurations
    config = json.loads((ob.ASSETS / "mtil-tiny-siglip.json").read_text())
    config["vision_cfg"] = {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                            "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear"}
    monkeypatch.setitem(factory._MODEL_CONFIGS, "ViT-B-16-SigLIP", config)
    model, _ = ob.build_open_clip("open_clip:ViT-B-16-SigLIP", clip_root=tmp_path, untrained=True, seed=0)
    targets = resolve_targets(model, ["attn.qkv"])
    assert targets and all(t.startswith("visual.trunk.blocks.") for t in targets)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    model.requires_grad_(False)
    with torch.no_grad():
        before = model.encode_image(images)
    inject_lora(model, LoraSettings(r=2, targets=("attn.qkv",)), seed=0)
    model.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), before)  # a fresh adapter changes nothing here either
    config_args = type("Config", (), {"model": "open_clip:ViT-B-16-SigLIP", "k": 1})()
    with pytest.raises(UserError, match="timm tower"):
        CLIPAST.check_model(type("AST", (), {"config": config_args})(), model)


def test_orthogonal_gradients_project_an_open_clip_models_second_task_off_the_first(tmp_path, monkeypatch):
    from mtil.methods.ogd import DEFAULT_PATTERNS
    from tests.test_ogd import _assert_projected, _record_hook

    records: list = []
    _record_hook(monkeypatch, records)
    save = tmp_path / "run"
    assert main(["--model", OPEN_TOYCLIP, *FAST, "--train-dataset", "ToyColorB,ToyColorA", "--iterations", "3",
                 "--orthogonal-gradients", "2", "--save", str(save)]) == 0
    names = set(records[0]["before"])
    assert len(names) == 4 * 2 * 2  # OGD's default matrices x 2 blocks x 2 encoders, found by OpenAI's names
    assert all(any(n.endswith(p[1:]) for p in DEFAULT_PATTERNS) for n in names)
    for record in records[:3]:  # task 1: nothing to project yet
        assert all(torch.equal(record["before"][n], record["after"][n]) for n in names)
    _assert_projected(records[3:], load(save / "grad_ToyColorB.pth")["basis"])
