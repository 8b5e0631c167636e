"""Shared fixtures: a tiny CLIP, an isolated dataset cache, no network for CLIP weights."""
from __future__ import annotations

import os
import urllib.error

import pytest
import torch

from mtil.datasets import registry
from mtil.models import clip_loading


def pytest_configure(config):
    # The models under test are tiny: one intra-op thread is as fast on an idle CPU and far faster on a busy one
    # (OpenMP threads spin-waiting for a core made single forward passes 100x slower on a loaded 2-core machine).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and mtil's own --threads default keeps it (in-process runs, children)


@pytest.fixture(autouse=True)
def _isolated_dataset_cache():
    """``open_dataset`` caches opened datasets per process: every test starts and ends with an empty cache."""
    registry._OPEN.clear()
    yield
    registry._OPEN.clear()


@pytest.fixture(autouse=True)
def _no_weight_downloads(monkeypatch):
    """No test may fetch CLIP weights from the internet; a test that needs another behaviour re-patches it."""

    def refuse(url, root, *args, **kwargs):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(clip_loading.clip_api, "_download", refuse)


@pytest.fixture
def micro():
    """A freshly built ``micro-vit`` (random weights, seed 0) on the CPU, in eval mode."""
    loaded = clip_loading.load_clip("micro-vit", seed=0)
    loaded.model.eval()
    return loaded


@pytest.fixture
def probe_inputs(micro):
    """Fixed image and token batches that fit ``micro-vit`` (32x32 images, context length 16)."""
    generator = torch.Generator().manual_seed(1234)
    resolution = micro.model.visual.input_resolution
    images = torch.randn(3, 3, resolution, resolution, generator=generator)
    from mtil.models.text import tokenize

    tokens = tokenize(micro.model, ["a photo of a dog.", "a red square", "zzz"])
    return images, tokens


@pytest.fixture
def outputs_of(probe_inputs):
    """A function: model -> (image features, text features, logits per image) on the probe inputs."""
    images, tokens = probe_inputs

    def outputs(model):
        model.eval()
        with torch.no_grad():
            logits_per_image, _ = model(images, tokens)
            return model.encode_image(images), model.encode_text(tokens), logits_per_image

    return outputs
