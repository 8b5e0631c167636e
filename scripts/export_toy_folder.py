"""Write a ToyWorld task as an image folder (``OUT/train/<class>/*.png``, ``OUT/test/<class>/*.png``), to try
``ImageFolder:OUT`` (few-shot runs, sweeps) without downloading anything.

    python scripts/export_toy_folder.py --task ToyColorB --train 20 --test 50 data/toy_colorb
    python -m mtil.main --model toyclip --train-dataset ImageFolder:data/toy_colorb --shots 2 ...
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mtil.datasets.toyworld import TASKS, ToyTaskDataset


def export(task: str, out: Path, per_class: dict[str, int]) -> None:
    for split, count in per_class.items():
        data = ToyTaskDataset(task, split=split)
        classes = len(data.classes)
        for index in range(min(count * classes, len(data))):  # item i has label i % classes: balanced
            image, label = data[index]
            folder = out / split / data.classes[label].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (train/ and test/ inside)")
    parser.add_argument("--task", default="ToyColorB", choices=sorted(TASKS))
    parser.add_argument("--train", type=int, default=20, help="training images per class")
    parser.add_argument("--test", type=int, default=50, help="test images per class")
    args = parser.parse_args()
    export(args.task, args.out, {"train": args.train, "test": args.test})
    print(f"wrote {args.task} to {args.out}: use --train-dataset ImageFolder:{args.out}")


if __name__ == "__main__":
    main()
