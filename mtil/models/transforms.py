"""Image preprocessing matched to a model (as in the CLIP and ZSCL papers): its input resolution, and the mean,
standard deviation and interpolation its back-end trained with (OpenAI's for clip-anytorch models; open_clip
records its own per model, e.g. SigLIP's 0.5/0.5)."""
from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


@dataclass(frozen=True)
class ImageSpec:
    """What a model expects of an image: square side in pixels, normalisation, resize interpolation, and how an
    evaluation image is made square: ``shortest`` (resize the short side, center crop: CLIP's) or ``squash``
    (resize both sides: SigLIP's)."""

    resolution: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @property
    def mode(self) -> T.InterpolationMode:
        return T.InterpolationMode(self.interpolation)


def as_image_spec(spec: ImageSpec | int) -> ImageSpec:
    """``spec``, or for an int the spec of a clip-anytorch model of that resolution."""
    return spec if isinstance(spec, ImageSpec) else ImageSpec(int(spec))


def _to_rgb(image):
    return image.convert("RGB")


def eval_transform(spec: ImageSpec | int) -> T.Compose:
    """Resize + center crop (or a squash to the square) + normalisation (an int: a clip-anytorch model of that
    resolution)."""
    spec = as_image_spec(spec)
    side = spec.resolution
    square = [T.Resize((side, side), interpolation=spec.mode)] if spec.resize_mode == "squash" else \
        [T.Resize(side, interpolation=spec.mode), T.CenterCrop(side)]
    return T.Compose([
        *square,
        _to_rgb,
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def train_transform(spec: ImageSpec | int) -> T.Compose:
    """RandomResizedCrop (scale 0.9-1) + normalisation: the paper's training augmentation."""
    spec = as_image_spec(spec)
    return T.Compose([
        T.RandomResizedCrop(spec.resolution, scale=(0.9, 1.0), interpolation=spec.mode),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])
