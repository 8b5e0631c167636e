"""The shipped pre-trained tiny CLIP (``--model toyclip``): its file and hash, what the trimming keeps, that it
knows the benchmark zero-shot, and that the script that made it is deterministic."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtil.datasets import toyworld
from mtil.errors import UserError
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.models import toyclip
from mtil.models.architectures import TINY_ARCHITECTURES
from mtil.models.clip_loading import build_clip, load_clip
from mtil.models.text import tokenize

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_file_matches_its_hash_and_is_small():
    assert toyclip.ASSET.is_file()
    assert toyclip.file_sha256(toyclip.ASSET) == toyclip.SHA256
    assert toyclip.ASSET.stat().st_size < 5e6


def test_a_damaged_or_missing_file_is_refused_with_how_to_restore_it(tmp_path):
    damaged = tmp_path / "toyclip.pt"
    data = bytearray(toyclip.ASSET.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        toyclip.read_asset(damaged)
    with pytest.raises(UserError, match="missing.*pretrain_toyclip"):
        toyclip.read_asset(tmp_path / "absent.pt")


def test_trimming_keeps_the_listed_rows_and_zeroes_the_rest(tmp_path):
    arch = TINY_ARCHITECTURES["micro-vit"]
    model = build_clip(arch, seed=3)
    ids = [49406, 49407, 320, 1929]
    path = tmp_path / "t.pt"
    digest = toyclip.write_asset(path, model.state_dict(), arch, ids, {})
    weights, read_arch = toyclip.read_asset(path, digest)
    assert read_arch == arch
    embedding = weights["token_embedding.weight"]
    original = model.state_dict()["token_embedding.weight"]
    assert torch.equal(embedding[ids], original[ids])
    others = torch.ones(arch.vocab_size, dtype=torch.bool)
    others[ids] = False
    assert embedding[others].abs().sum() == 0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k != "token_embedding.weight")


def test_every_word_of_the_benchmark_has_its_row():
    payload = torch.load(toyclip.ASSET, weights_only=True)
    kept = set(payload["token_ids"].tolist())
    model = build_clip(TINY_ARCHITECTURES["micro-vit"])
    rng = np.random.default_rng(12345)  # other captions than the script's own sample
    texts = [toyworld.caption_for(toyworld.sample_scene(rng), rng) for _ in range(3000)]
    texts += [t.format(c) for info in toyworld.TASKS.values() for t in info.templates for c in info.classes]
    used = set(tokenize(model, texts).unique().tolist()) - {0}
    assert used <= kept


def test_the_shipped_model_knows_colour_and_background_zero_shot():
    model = load_clip("toyclip").model
    evaluator = ZeroShotEvaluator(model, workers=0, max_size=400)
    for name, floor in (("ToyColor", 60.0), ("ToyBackground", 60.0)):
        assert evaluator.evaluate(name).top1 >= floor, name
    random_model = load_clip("toyclip", untrained=True, seed=0).model
    assert ZeroShotEvaluator(random_model, workers=0, max_size=400).evaluate("ToyColor").top1 < 40.0


def test_pretraining_script_is_deterministic(tmp_path):
    outputs = []
    for run in ("a", "b"):  # other names: the file's bytes must not depend on where it is written
        out = tmp_path / run / f"{run}.pt"
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_toyclip.py"), "--steps", "3",
                               "--warmup", "1", "--batch-size", "8", "--pool", "32", "--eval-size", "8",
                               "--eval-every", "3", "--threads", "1", "--device", "cpu", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "zero-shot % (chance)" in done.stdout and "SHA-256" in done.stdout
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
