"""Classify one image against a list of class names (``--eval-single``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

from mtil.errors import UserError
from mtil.models.text import encode_texts
from mtil.models.transforms import eval_transform
from mtil.models.backend import image_spec


def read_class_names(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--class-names file {path} does not exist (expected one class name per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--class-names file {path} is not UTF-8 text (expected one class name per line)") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"--class-names file {path} is empty (expected one class name per line)")
    return names


def read_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"--eval-single: image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"--eval-single: cannot read image {path} ({type(exc).__name__})") from None


@torch.no_grad()
def classify_image(model: nn.Module, image: Image.Image, classnames: list[str], prompt: str) -> list[tuple[str, float]]:
    """(class name, probability) pairs, most probable first."""
    device = next(model.parameters()).device
    model.eval()
    pixels = eval_transform(image_spec(model))(image).unsqueeze(0).to(device)
    image_features = F.normalize(model.encode_image(pixels).float(), dim=-1)
    text_features = encode_texts(model, [prompt.format(name) for name in classnames])
    probabilities = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)[0]
    order = probabilities.argsort(descending=True).tolist()
    return [(classnames[i], float(probabilities[i])) for i in order]
