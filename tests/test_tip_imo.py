"""Tip-Adapter with the IMO adapter (--imo-adapter): the zero-shot term reads the original features, the cache
affinity the adapted ones; the model itself stays plain CLIP."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtil.adapters.tip_imo import IMOFeatures, TipIMOHead
from mtil.main import main
from mtil.models.clip_loading import load_clip
from mtil.models.heads import head_from_state, head_state
from mtil.models.imo_adapter import add_imo_adapters, imo_adapters, remove_imo_adapters, save_imo_adapters

TOY = ["--model", "toyclip", "--train-dataset", "ToyColorB", "--shots", "2", "--max-evaluation-size", "200",
       "--batch-size-eval", "100", "--workers", "0", "--device", "cpu", "--threads", "1"]


def adapter_file(path, model_name: str = "toyclip", trained: bool = True, seed: int = 0):
    """An adapter file for ``model_name``: identity (fresh) or with random non-zero ``up`` weights."""
    model = load_clip(model_name, seed=0).model
    adapters = add_imo_adapters(model, scale=0.5)
    if trained:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for adapter in adapters:
                adapter.up.weight.copy_(0.2 * torch.randn(adapter.up.weight.shape, generator=generator))
    save_imo_adapters(model, path)
    return path


def test_features_are_original_then_adapted_and_the_model_stays_plain(tmp_path):
    model = load_clip("micro-vit", seed=0).model.eval()
    with_adapters = load_clip("micro-vit", seed=0).model.eval()
    adapters = add_imo_adapters(with_adapters, scale=0.5)
    with torch.no_grad():
        for adapter in adapters:
            adapter.up.weight.normal_(0, 0.3)
    tensors = {k: v.clone() for k, v in imo_adapters(with_adapters).state_dict().items()}
    images = torch.randn(3, 3, model.visual.input_resolution, model.visual.input_resolution)
    keys_before = set(model.state_dict())
    features = IMOFeatures(tensors, 0.5).encode(model, images)
    with torch.no_grad():
        original = F.normalize(model.encode_image(images).float(), dim=-1)
        adapted = F.normalize(with_adapters.encode_image(images).float(), dim=-1)
    width = original.shape[1]
    assert torch.equal(features[:, :width], original)
    torch.testing.assert_close(features[:, width:], adapted, rtol=0, atol=1e-6)
    assert not torch.allclose(adapted, original, atol=1e-3)  # the adapter does change the affinity features
    assert set(model.state_dict()) == keys_before  # attached for the pass only
    remove_imo_adapters(with_adapters)
    other = IMOFeatures({k: v * 2 for k, v in tensors.items()}, 0.5)
    assert other.feature_id != IMOFeatures(tensors, 0.5).feature_id  # never one feature-cache entry for both


def test_an_identity_adapter_gives_plain_tip_adapter_exactly(tmp_path):
    fresh = adapter_file(tmp_path / "fresh.pt", trained=False)
    assert main([*TOY, "--method", "tip-adapter", "--save", str(tmp_path / "plain")]) == 0
    assert main([*TOY, "--method", "tip-adapter", "--imo-adapter", str(fresh), "--save", str(tmp_path / "imo")]) == 0
    plain = json.loads((tmp_path / "plain" / "tip_ToyColorB.json").read_text())
    imo = json.loads((tmp_path / "imo" / "tip_ToyColorB.json").read_text())
    assert imo["imo_adapter"] == str(fresh) and "imo_features" in imo
    assert [r["top1"] for r in imo["results"]] == [r["top1"] for r in plain["results"]]
    assert pd.read_csv(tmp_path / "imo" / "fewshot.csv").equals(pd.read_csv(tmp_path / "plain" / "fewshot.csv"))


@pytest.mark.parametrize("method", ["tip-adapter", "tip-x"])
def test_a_trained_adapter_changes_the_cache_only_and_its_head_is_self_contained(tmp_path, method):
    path = adapter_file(tmp_path / "imo.pt")
    save = tmp_path / method
    assert main([*TOY, "--method", method, "--imo-adapter", str(path), "--save", str(save)]) == 0
    checkpoint = torch.load(save / "ToyColorB.pth", weights_only=True)
    assert not any("imo_adapter" in k for k in checkpoint["model"])  # CLIP's weights stay plain
    head = head_from_state(checkpoint["heads"]["ToyColorB"])
    assert isinstance(head, TipIMOHead) and bool(head.affinity_split)
    again = head_from_state(head_state(head))
    features = torch.randn(4, 2 * head.text_weight.shape[0])
    assert torch.equal(again(features), head(features))
    # the zero-shot term reads the first half only: changing the second half moves only the cache term
    changed = features.clone()
    changed[:, head.text_weight.shape[0]:] = torch.randn(4, head.text_weight.shape[0])
    assert torch.equal(head.parts(changed)["zero_shot"], head.parts(features)["zero_shot"])
    assert not torch.equal(head.parts(changed)["cache"], head.parts(features)["cache"])
    # --eval-only of the checkpoint classifies as the run did, with nothing but the checkpoint
    assert main(["--model", "toyclip", "--eval-only", "--load", str(save / "ToyColorB.pth"), "--eval-datasets",
                 "ToyColorB", "--max-evaluation-size", "200", "--workers", "0", "--device", "cpu",
                 "--save", str(tmp_path / "e")]) == 0
    final = pd.read_csv(save / "accuracy_matrix.csv").sort_values("after_task").top1.tolist()[-1]
    assert json.loads((tmp_path / "e" / "results.jsonl").read_text().splitlines()[-1])["top1"] == final


@pytest.mark.parametrize("argv, fragment", [
    (["--imo-adapter", "/nonexistent/imo.pt"], "does not exist"),
    (["--model", "micro-vit", "--imo-adapter", "FILE"], "trained for another model"),
])
def test_a_missing_or_foreign_adapter_is_one_line_before_anything_is_written(tmp_path, capsys, argv, fragment):
    path = adapter_file(tmp_path / "imo.pt")
    argv = [str(path) if a == "FILE" else a for a in argv]
    save = tmp_path / "run"
    assert main([*TOY, "--method", "tip-adapter", *argv, "--save", str(save)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not save.exists()
