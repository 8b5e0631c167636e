"""CLIP architecture hyper-parameters: OpenAI's named models, tiny test models, and inference from a state dict.

The tiny architectures use the very same ``clip.model.CLIP`` classes as the real ones, only smaller, so everything
tested on them runs the real code paths. Head counts follow OpenAI's rule (width // 64) so that a tiny state dict
can be rebuilt from its shapes alone, like an OpenAI one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class Architecture:
    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.vision_layers, tuple):
            d["vision_layers"] = list(self.vision_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Architecture":
        d = dict(d)
        if isinstance(d["vision_layers"], (list, tuple)):
            d["vision_layers"] = tuple(d["vision_layers"])
        return cls(**d)


_V = 49408  # CLIP's BPE vocabulary

OPENAI_ARCHITECTURES: dict[str, Architecture] = {
    "RN50": Architecture(1024, 224, (3, 4, 6, 3), 64, None, 77, _V, 512, 8, 12),
    "RN101": Architecture(512, 224, (3, 4, 23, 3), 64, None, 77, _V, 512, 8, 12),
    "RN50x4": Architecture(640, 288, (4, 6, 10, 6), 80, None, 77, _V, 640, 10, 12),
    "RN50x16": Architecture(768, 384, (6, 8, 18, 8), 96, None, 77, _V, 768, 12, 12),
    "RN50x64": Architecture(1024, 448, (3, 15, 36, 10), 128, None, 77, _V, 1024, 16, 12),
    "ViT-B/32": Architecture(512, 224, 12, 768, 32, 77, _V, 512, 8, 12),
    "ViT-B/16": Architecture(512, 224, 12, 768, 16, 77, _V, 512, 8, 12),
    "ViT-L/14": Architecture(768, 224, 24, 1024, 14, 77, _V, 768, 12, 12),
    "ViT-L/14@336px": Architecture(768, 336, 24, 1024, 14, 77, _V, 768, 12, 12),
}

TINY_ARCHITECTURES: dict[str, Architecture] = {
    # The built-in benchmark's model: 32x32 images in 4x4 patches (64 tokens), 2+2 layers of width 64, 24 text
    # tokens. Chosen by measured zero-shot gain per CPU second of contrastive pre-training on ToyCaptions: wider
    # (128) or coarser (8x8 patches) variants learned markedly slower per second on 2 cores.
    "tiny-vit": Architecture(64, 32, 2, 64, 4, 24, _V, 64, 1, 2),
    # The ModifiedResNet path at 32x32 (one block per stage).
    "tiny-rn": Architecture(128, 32, (1, 1, 1, 1), 16, None, 32, _V, 128, 2, 2),
    # The smallest thing that is still a CLIP: for fast unit tests.
    "micro-vit": Architecture(64, 32, 1, 64, 8, 16, _V, 64, 1, 1),
}

ALL_ARCHITECTURES = {**OPENAI_ARCHITECTURES, **TINY_ARCHITECTURES}


def architecture_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """Infer the architecture from parameter shapes (the same rules OpenAI's ``build_model`` uses)."""
    sd = state_dict
    if "visual.proj" in sd:
        vision_width = sd["visual.conv1.weight"].shape[0]
        vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        resolution = patch * grid
    else:
        vision_layers = tuple(
            len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)
        )
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        patch = None
        resolution = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5) * 32
    width = sd["ln_final.weight"].shape[0]
    return Architecture(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=resolution,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=width,
        transformer_heads=width // 64 or 1,
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )
