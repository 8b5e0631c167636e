"""Reference sentences (for ZSCL-style distillation): Conceptual Captions, the built-in captions, class prompts."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from mtil.errors import UserError

CC_FILE = "Validation_GCC-1.1.0-Validation_output.csv"


def conceptual_captions(location: str | Path) -> list[str]:
    """Captions (column ``title``) of the tab-separated Conceptual Captions validation file.

    Looked for at ``<location>/conceptual_captions/<file>`` and ``<location>/<file>``.
    """
    location = Path(location)
    candidates = [location / "conceptual_captions" / CC_FILE, location / CC_FILE]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(
            f"Conceptual Captions file not found: looked for {candidates[0]} and {candidates[1]}; download the "
            f"validation split's tab-separated file (columns title, filepath) and place it there"
        )
    try:
        table = pd.read_csv(path, sep="\t", usecols=["title"], dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"cannot read {path}: expected tab-separated columns 'title' and 'filepath' ({exc})") from None
    captions = [t.strip() for t in table["title"] if t.strip()]
    if not captions:
        raise UserError(f"{path} contains no captions")
    return captions


def toy_captions(count: int = 5000, seed: int = 0) -> list[str]:
    """Captions of the built-in benchmark's image-caption corpus (computed without rendering images)."""
    from mtil.datasets.toyworld import ToyCaptionDataset

    corpus = ToyCaptionDataset(split="train", size=count, seed=seed)
    return [corpus.caption(i) for i in range(len(corpus))]
