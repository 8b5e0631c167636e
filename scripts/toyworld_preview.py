"""Save a PNG grid of ToyWorld samples: one row per task, one column per class.

Usage: python scripts/toyworld_preview.py OUT.png [--per-class 2] [--scale 4] [--image-size 32]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mtil.datasets.toyworld import TASKS, ToyCaptionDataset, ToyTaskDataset


def build_grid(per_class: int = 2, scale: int = 4, image_size: int = 32, seed: int = 0) -> Image.Image:
    """One row per task (plus a caption-corpus row); each cell is an upscaled sample with its label."""
    cell = image_size * scale
    label_h = 12
    max_cols = max(len(t.classes) for t in TASKS.values()) * per_class
    rows = len(TASKS) + 1
    left = 90
    grid = Image.new("RGB", (left + max_cols * cell, rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(list(TASKS) + ["captions"]):
        y = row * (cell + label_h)
        draw.text((4, y + cell // 2), name, fill=(0, 0, 0))
        if name == "captions":
            ds = ToyCaptionDataset("test", size=max_cols, seed=seed, image_size=image_size)
            items = [(ds[i][0], str(i)) for i in range(max_cols)]
        else:
            ds = ToyTaskDataset(name, "test", seed=seed, image_size=image_size)
            k = len(ds.classes)
            items = [(ds[c + k * j][0], ds.classes[c]) for c in range(k) for j in range(per_class)]
        for col, (img, text) in enumerate(items):
            x = left + col * cell
            grid.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x + 2, y + cell), text, fill=(0, 0, 0))
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    build_grid(args.per_class, args.scale, args.image_size, args.seed).save(args.out)
    ds = ToyCaptionDataset("test", size=8, seed=args.seed)
    for i in range(8):
        print(f"caption {i}: {ds.caption(i)}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
