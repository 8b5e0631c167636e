"""Image preprocessing matched to a model's input resolution (as in the CLIP and ZSCL papers)."""
from __future__ import annotations

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


def _to_rgb(image):
    return image.convert("RGB")


def eval_transform(resolution: int) -> T.Compose:
    """Resize (bicubic) + center crop + CLIP normalisation."""
    return T.Compose([
        T.Resize(resolution, interpolation=BICUBIC),
        T.CenterCrop(resolution),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def train_transform(resolution: int) -> T.Compose:
    """RandomResizedCrop (scale 0.9-1, bicubic) + CLIP normalisation: the paper's training augmentation."""
    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(0.9, 1.0), interpolation=BICUBIC),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
