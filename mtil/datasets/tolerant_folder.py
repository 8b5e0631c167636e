"""An ``ImageFolder`` that survives a damaged image mid-run.

A truncated, zero-byte or undecodable file, or a decompression bomb (PIL refuses images over twice
``Image.MAX_IMAGE_PIXELS``), would otherwise raise in the middle of training or evaluation, hours in, and again on
every re-run. Here the item is replaced by the next readable one (deterministically: the same file is always
replaced by the same item, so exact resume holds), and each skipped file is reported once per process on stderr
with its path and the count so far. A split with no readable image at all is a one-line error.
"""
from __future__ import annotations

import sys
from typing import Any

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from mtil.errors import UserError

UNREADABLE = (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError)


class TolerantImageFolder(ImageFolder):
    """``ImageFolder`` whose unreadable files are skipped (see the module docstring); images are decoded eagerly
    so that a damaged file is met here, not later in a transform."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: set[str] = set()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path = self.samples[(index + offset) % len(self.samples)][0]
            try:
                image, label = super().__getitem__((index + offset) % len(self.samples))
                if isinstance(image, Image.Image):
                    image.load()
                return image, label
            except UNREADABLE as exc:
                if path not in self.skipped:
                    self.skipped.add(path)
                    print(f"mtil: warning: skipped unreadable image {path} ({type(exc).__name__}: "
                          f"{str(exc)[:80]}); {len(self.skipped)} skipped in {self.root} so far", file=sys.stderr)
        raise UserError(f"no image under {self.root} could be read ({len(self.skipped)} unreadable files)")
