"""Image-caption datasets (for contrastive training and as reference data), by name."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from mtil.errors import UserError

CAPTION_DATASETS = ("ToyCaptions",)


def open_caption_dataset(name: str, location: str | Path = "data", split: str = "train") -> Dataset:
    """A dataset of (PIL image, caption) pairs."""
    if name == "ToyCaptions":
        from mtil.datasets.toyworld import ToyCaptionDataset

        return ToyCaptionDataset(split=split, seed=0)
    raise UserError(f"unknown caption dataset {name!r}; accepted: {', '.join(CAPTION_DATASETS)}")
