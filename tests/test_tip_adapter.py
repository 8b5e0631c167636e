"""Tip-Adapter, Tip-Adapter-F and Tip-X (``mtil/adapters/``, ``mtil/methods/tip_adapter.py``): the logits against
hand computation, the identities (α = 0 is zero-shot, γ = 0 is Tip-Adapter), the head through a checkpoint, the
search (val only, deterministic ties, blind to the test split), the feature store (hits, other weights, damaged
files) and whole runs of ``toyclip`` on ToyColorB, where a second run with the same ``--feature-cache`` never
calls the image encoder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP

from mtil.adapters.feature_cache import FeatureStore
from mtil.adapters.search import grid_search, parse_grid
from mtil.adapters.tip import (
    TipHead,
    class_distribution,
    fit_keys,
    kl_and_affinity_ranges,
    one_hot_values,
    tipx_term,
)
from mtil.datasets.registry import open_dataset
from mtil.errors import UserError
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.main import main
from mtil.methods.tip_adapter import AugmentedViews, augment_transform
from mtil.models.clip_loading import load_clip
from mtil.models.heads import head_from_state, head_state

TOY = ["--model", "toyclip", "--train-dataset", "ToyColorB", "--shots", "2", "--max-evaluation-size", "200",
       "--batch-size-eval", "100", "--workers", "0", "--device", "cpu", "--threads", "1"]


def _cache(seed: int = 0, queries: int = 5, dim: int = 6, classes: int = 3, shots: int = 2):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    labels = torch.arange(classes).repeat_interleave(shots)
    return {"f": unit(queries, dim), "W": unit(classes, dim).T.contiguous(), "keys": unit(classes * shots, dim),
            "values": one_hot_values(labels, classes), "labels": labels}


# ------------------------------------------------------------------------------------------------ formulas


def test_tip_logits_equal_the_formula_computed_by_hand():
    c = _cache()
    s, alpha, beta = 27.5, 1.7, 3.2
    head = TipHead(c["W"], c["keys"], c["values"], s, alpha, beta)
    logits = head(c["f"])
    f, W, K, labels = c["f"].tolist(), c["W"].tolist(), c["keys"].tolist(), c["labels"].tolist()
    for i in range(len(f)):
        for cls in range(len(W[0])):
            zero_shot = s * sum(f[i][d] * W[d][cls] for d in range(len(f[i])))
            cache = sum(math.exp(-beta * (1 - sum(f[i][d] * K[j][d] for d in range(len(f[i])))))
                        for j in range(len(K)) if labels[j] == cls)
            assert logits[i, cls].item() == pytest.approx(zero_shot + alpha * cache, rel=1e-5)


def test_alpha_zero_is_the_zero_shot_head_times_the_logit_scale():
    c = _cache(1)
    head = TipHead(c["W"], c["keys"], c["values"], 14.25, 0.0, 5.0)
    assert torch.equal(head(c["f"]), 14.25 * (c["f"] @ c["W"]))


def _tipx_head(c, gamma: float) -> TipHead:
    distribution = class_distribution(c["keys"], c["W"])
    kl_range, a_range = kl_and_affinity_ranges(c["f"], c["f"], c["keys"], c["W"], distribution)
    return TipHead(c["W"], c["keys"], c["values"], 20.0, 1.3, 2.5, gamma, distribution, kl_range, a_range)


def test_tipx_with_gamma_zero_is_tip_adapter_and_its_term_is_the_documented_one():
    c = _cache(2)
    tip = TipHead(c["W"], c["keys"], c["values"], 20.0, 1.3, 2.5)
    assert torch.equal(_tipx_head(c, 0.0)(c["f"]), tip(c["f"]))
    head = _tipx_head(c, 0.7)
    assert not torch.allclose(head(c["f"]), tip(c["f"]))
    # by hand: p, q = softmax(cos / 0.5); KL(p_i || q_j); mapped from its range onto the affinities' range; negated
    f, W, K, labels = c["f"], c["W"], c["keys"], c["labels"].tolist()
    p = [[math.exp(v / 0.5) for v in row] for row in (f @ W).tolist()]
    p = [[v / sum(row) for v in row] for row in p]
    q = [[math.exp(v / 0.5) for v in row] for row in (K @ W).tolist()]
    q = [[v / sum(row) for v in row] for row in q]
    kl = [[sum(pi[k] * math.log(pi[k] / qj[k]) for k in range(len(pi))) for qj in q] for pi in p]
    a = (f @ K.T).tolist()
    lo, hi = min(map(min, kl)), max(map(max, kl))
    alo, ahi = min(map(min, a)), max(map(max, a))
    for i in range(len(kl)):
        for cls in range(W.shape[1]):
            term = sum(-(alo + (kl[i][j] - lo) / (hi - lo) * (ahi - alo)) for j in range(len(K)) if labels[j] == cls)
            expected = tip(f)[i, cls].item() + 0.7 * term
            assert head(f)[i, cls].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_tipx_term_favours_the_class_of_the_cache_image_with_the_query_s_distribution():
    c = _cache(3)
    distribution = class_distribution(c["keys"], c["W"])
    query = c["keys"][4:5]  # a query equal to cache image 4 (class 2): KL 0 to it, the smallest
    kl_range, a_range = kl_and_affinity_ranges(c["f"], c["f"], c["keys"], c["W"], distribution)
    one = tipx_term(query, c["W"], distribution[4:5], c["values"][4:5], kl_range, a_range)
    other = tipx_term(query, c["W"], distribution[0:1], c["values"][0:1], kl_range, a_range)
    assert one[0, 2] > other[0, 0]  # a closer distribution (smaller KL) is a larger affinity


def test_affinity_features_seam_splits_original_and_adapted_features():
    c = _cache(4)
    adapted = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(9)), dim=-1)
    split = TipHead(c["W"], c["keys"], c["values"], 10.0, 2.0, 3.0, affinity_split=True)
    expected = 10.0 * c["f"] @ c["W"] + 2.0 * torch.exp(-3.0 * (1 - adapted @ c["keys"].T)) @ c["values"]
    assert torch.allclose(split(torch.cat([c["f"], adapted], dim=1)), expected, atol=1e-5)
    with pytest.raises(ValueError):
        split(c["f"])


def test_heads_round_trip_through_a_weights_only_checkpoint(tmp_path):
    c = _cache(5)
    for head in (TipHead(c["W"], c["keys"], c["values"], 20.0, 1.3, 2.5), _tipx_head(c, 0.4)):
        torch.save({"heads": {"X": head_state(head)}}, tmp_path / "ckpt.pth")
        entry = torch.load(tmp_path / "ckpt.pth", weights_only=True)["heads"]["X"]
        again = head_from_state(entry)
        assert type(again) is TipHead and again.kind == "tip" and again.is_tipx == head.is_tipx
        assert torch.equal(again(c["f"]), head(c["f"]))


# ------------------------------------------------------------------------------------------------ search


def test_grid_search_refuses_the_test_split_and_parses_grids_sorted():
    c = _cache(6)
    zero_shot, a = 10 * c["f"] @ c["W"], c["f"] @ c["keys"].T
    with pytest.raises(UserError, match="test split is refused"):
        grid_search(zero_shot, a, c["values"], torch.zeros(5, dtype=torch.long), [1.0], [1.0], split="test")
    assert parse_grid("3, 0.5,1") == [0.5, 1.0, 3.0]
    for bad in ("", "1,1", "-1", "nan", "a"):
        with pytest.raises(Exception):
            parse_grid(bad)


def test_grid_search_takes_the_best_accuracy_then_the_lower_cross_entropy():
    c = _cache(7)
    zero_shot, a = 10 * c["f"] @ c["W"], c["f"] @ c["keys"].T
    labels = (zero_shot + 3 * torch.exp(-2 * (1 - a)) @ c["values"]).argmax(1)
    best, table = grid_search(zero_shot, a, c["values"], labels, [0.5, 3.0, 1.0], [2.0, 0.1])
    assert [(p.alpha, p.beta) for p in table][:2] == [(0.5, 0.1), (0.5, 2.0)]  # grid order: sorted, alpha outermost
    top = max(p.top1 for p in table)
    assert best.top1 == top and best.ce == min(p.ce for p in table if p.top1 == top)
    for point in table:  # each point's accuracy is what its head gives
        head = TipHead(c["W"], c["keys"], c["values"], 10.0, point.alpha, point.beta)
        assert point.top1 == pytest.approx(100 * (head(c["f"]).argmax(1) == labels).float().mean().item())


# ------------------------------------------------------------------------------------------------ Tip-Adapter-F


def test_fit_keys_is_deterministic_lowers_the_loss_and_moves_the_keys():
    c = _cache(8, queries=24)
    labels = torch.arange(24) % 3
    args = (c["keys"], c["f"], c["f"], labels, c["values"], c["W"], 10.0, 1.0, 3.0)
    keys, history = fit_keys(*args, epochs=15, lr=1e-2, batch_size=8, generator_seed=3)
    again, _ = fit_keys(*args, epochs=15, lr=1e-2, batch_size=8, generator_seed=3)
    assert torch.equal(keys, again) and not torch.equal(keys, c["keys"])
    assert len(history) == 15 and history[-1]["loss"] < history[0]["loss"]


# ------------------------------------------------------------------------------------------------ feature store


def test_feature_store_round_trip_other_weights_and_damaged_files(tmp_path, micro, capsys):
    store = FeatureStore(tmp_path / "fc", salt="fp32")
    model = micro.model
    features, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    assert store.load(model, 0, {"d": 1}) is None
    store.save(model, 0, {"d": 1}, features, labels)
    found = store.load(model, 0, {"d": 1})
    assert torch.equal(found[0], features) and torch.equal(found[1], labels)
    assert store.load(model, 0, {"d": 2}) is None  # another descriptor
    other = load_clip("micro-vit", seed=1).model
    assert FeatureStore(tmp_path / "fc", salt="fp32").load(other, 0, {"d": 1}) is None  # other weights
    assert FeatureStore(tmp_path / "fc", salt="bf16").load(model, 0, {"d": 1}) is None  # other precision
    path = store.path(model, 0, {"d": 1})
    path.write_bytes(path.read_bytes()[:50])
    assert store.load(model, 0, {"d": 1}) is None and store.damaged == 1
    assert "cannot be used" in capsys.readouterr().err
    store.save(model, 0, {"d": 1}, features, labels)  # the recomputed features replace the damaged file
    assert torch.equal(store.load(model, 0, {"d": 1})[0], features)
    with torch.no_grad():  # the weights move: the same version keeps its fingerprint, a new one is hashed anew
        next(model.visual.parameters()).add_(1.0)
    assert store.load(model, 0, {"d": 1}) is not None and store.load(model, 1, {"d": 1}) is None


def test_augmented_views_are_seeded_per_view_and_image():
    raw = open_dataset("ToyColorB", "data", False).raw("train")
    views = AugmentedViews(raw, augment_transform(32), seed=4, views=3)
    again = AugmentedViews(raw, augment_transform(32), seed=4, views=3)
    n = len(raw)
    assert torch.equal(views[n + 5][0], again[n + 5][0])  # view 1 of image 5, in any order or process
    assert not torch.equal(views[5][0], views[n + 5][0])  # another view of the same image differs
    assert views[n + 5][1] == raw[5][1]


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture
def image_encoder_calls(monkeypatch):
    """Counts every image that goes through CLIP's image encoder (the evaluator's and the method's)."""
    calls = {"images": 0}
    original = CLIP.encode_image

    def counting(self, images):
        calls["images"] += images.shape[0]
        return original(self, images)

    monkeypatch.setattr(CLIP, "encode_image", counting)
    return calls


def _final(save: Path) -> dict[str, float]:
    table = pd.read_csv(save / "fewshot.csv")
    last = table[table.after_task == table.after_task.max()]
    return {row.split: row.top1 for row in last.itertuples()}


def test_tip_adapter_run_beats_zero_shot_and_a_second_run_skips_the_image_encoder(tmp_path, image_encoder_calls):
    cache = ["--feature-cache", str(tmp_path / "fc")]
    assert main([*TOY, "--method", "tip-adapter", *cache, "--save", str(tmp_path / "a")]) == 0
    first = image_encoder_calls["images"]
    assert first > 0
    record = json.loads((tmp_path / "a" / "tip_ToyColorB.json").read_text())
    assert record["cache_images"] == 8 and record["val_images"] == 8 and len(record["results"]) == 7 * 8
    matrix = pd.read_csv(tmp_path / "a" / "accuracy_matrix.csv")
    zero_shot, tip = matrix.sort_values("after_task").top1.tolist()
    assert tip > zero_shot
    assert main([*TOY, "--method", "tip-adapter", *cache, "--save", str(tmp_path / "b")]) == 0
    assert image_encoder_calls["images"] == first  # every feature came from the store
    assert json.loads((tmp_path / "b" / "tip_ToyColorB.json").read_text())["chosen"] == record["chosen"]
    assert _final(tmp_path / "b") == _final(tmp_path / "a")
    # the checkpoint's head classifies under --eval-only as in the run
    assert main(["--model", "toyclip", "--eval-only", "--load", str(tmp_path / "b" / "ToyColorB.pth"),
                 "--eval-datasets", "ToyColorB", "--max-evaluation-size", "200", "--workers", "0",
                 "--device", "cpu", "--save", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "results.jsonl").read_text().splitlines()[-1])["top1"] == tip


def test_the_search_never_reads_the_test_split(tmp_path, monkeypatch):
    """Tip-X (the largest search) chooses the same with the test images' features and labels poisoned."""
    assert main([*TOY, "--method", "tip-x", "--save", str(tmp_path / "clean")]) == 0
    original = ZeroShotEvaluator.encoded

    def poisoned(self, name, split, part, head):
        features, labels = original(self, name, split, part, head)
        if split == "test":
            g = torch.Generator().manual_seed(0)
            features = F.normalize(torch.randn(features.shape, generator=g), dim=-1)
            labels = torch.randint(0, 4, labels.shape, generator=g)
        return features, labels

    monkeypatch.setattr(ZeroShotEvaluator, "encoded", poisoned)
    assert main([*TOY, "--method", "tip-x", "--save", str(tmp_path / "poisoned")]) == 0
    clean, dirty = (json.loads((tmp_path / s / "tip_ToyColorB.json").read_text()) for s in ("clean", "poisoned"))
    assert dirty["chosen"] == clean["chosen"] and dirty["results"] == clean["results"]
    assert _final(tmp_path / "poisoned")["test"] != _final(tmp_path / "clean")["test"]  # the poison took effect


def test_tip_adapter_f_trains_the_keys_only_and_keeps_the_last_epoch(tmp_path):
    save = tmp_path / "f"
    assert main([*TOY, "--method", "tip-adapter-f", "--tip-epochs", "3", "--save", str(save)]) == 0
    record = json.loads((save / "tip_ToyColorB.json").read_text())
    assert [h["epoch"] for h in record["training"]["history"]] == [1, 2, 3]
    assert record["training"]["kept"] == "last epoch"
    checkpoint = torch.load(save / "ToyColorB.pth", weights_only=True)
    head = head_from_state(checkpoint["heads"]["ToyColorB"])
    pretrained = load_clip("toyclip").model.state_dict()
    assert all(torch.equal(v, pretrained[k]) for k, v in checkpoint["model"].items())  # CLIP stayed frozen
    assert head.keys.shape == (8, 64)
    # the cache's keys are unit vectors; trained ones (never renormalised) are not: the keys moved
    assert not torch.allclose(head.keys.norm(dim=1), torch.ones(8), atol=1e-4)
    history = record["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("argv, fragment", [
    (["--method", "tip-adapter", "--model", "toyclip", "--train-dataset", "ToyColorB"], "give --shots K"),
    ([*TOY, "--method", "tip-adapter", "--base-new"], "drop --base-new"),
    ([*TOY, "--method", "tip-adapter", "--tip-epochs", "3"], "--tip-epochs belongs to --method tip-adapter-f"),
    ([*TOY, "--method", "tip-adapter", "--tip-alpha-grid", "1,1"], "appears twice"),
    ([*TOY, "--method", "tip-adapter", "--lr", "1e-3"], "trains nothing"),
])
def test_refused_settings_are_one_line(argv, fragment, tmp_path, capsys):
    assert main([*argv, "--save", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_feature_cache_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main([*TOY, "--method", "tip-adapter", "--feature-cache", str(tmp_path / "file"),
                 "--save", str(tmp_path / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
