"""What a training step costs through either model back-end: the same ViT architecture built by clip-anytorch and
by open_clip, stepped side by side in interleaved rounds in one process (this machine is shared and noisy, so only
ratios measured together are read).

A step is mtil's fine-tuning step in ``--train-mode whole``: image and class-prompt features
(``PromptClassifier``), cross-entropy, backward, AdamW. Pairs:

* ``toyclip`` against ``open_clip:mtil-tiny-vit/toyclip`` (the same weights);
* ``ViT-B/32`` against ``open_clip:ViT-B-32-quickgelu`` (OpenAI's architecture, QuickGELU included; random
  weights: the cost does not depend on their values).

    python scripts/bench_backends.py --rounds 7 --csv docs/results/bench_backends.csv
    python scripts/bench_backends.py --pairs tiny --rounds 2 --steps 2      # a quick check that it runs
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtil.datasets.registry import open_dataset  # noqa: E402
from mtil.models.backend import backend_name, image_resolution  # noqa: E402
from mtil.models.clip_loading import load_clip  # noqa: E402
from mtil.models.train_modes import PromptClassifier, select_trainable  # noqa: E402

PAIRS = {
    "tiny": (("toyclip", False), ("open_clip:mtil-tiny-vit/toyclip", False), 64),
    "vit-b-32": (("ViT-B/32", True), ("open_clip:ViT-B-32-quickgelu", True), 8),
}


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{platform.machine()} ({cores} cores, {memory:.0f} GiB, torch {torch.__version__.split('+')[0]}, "
            f"{torch.get_num_threads()} threads)")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Stepper:
    """One model, its classifier, optimiser and a fixed batch: ``step()`` is one fine-tuning step."""

    def __init__(self, name: str, untrained: bool, batch_size: int):
        self.model = load_clip(name, untrained=untrained, seed=0).model.train()
        data = open_dataset("ToyColorB")
        self.classifier = PromptClassifier(self.model, data.classnames, data.templates[0], "whole")
        select_trainable(self.model, "whole")
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        side = image_resolution(self.model)
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_size, 3, side, side, generator=generator)
        self.labels = torch.randint(0, len(data.classnames), (batch_size,), generator=generator)

    def step(self) -> None:
        loss = F.cross_entropy(self.classifier(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def timed_steps(stepper: Stepper, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        stepper.step()
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="tiny,vit-b-32", help=f"comma-separated, from {', '.join(PAIRS)}")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (each times both back-ends)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per back-end per round")
    parser.add_argument("--csv", default=None, help="append the figures to this CSV file")
    args = parser.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"--pairs: unknown {', '.join(unknown)}; from {', '.join(PAIRS)}")
    rows = []
    for pair in pairs:
        (clip_name, clip_untrained), (open_name, open_untrained), batch = PAIRS[pair]
        steppers = [Stepper(clip_name, clip_untrained, batch), Stepper(open_name, open_untrained, batch)]
        assert [backend_name(s.model) for s in steppers] == ["clip", "open_clip"]
        for stepper in steppers:  # warm-up: allocator, first-call costs
            timed_steps(stepper, 2)
        times: list[list[float]] = [[], []]
        for round_index in range(args.rounds):
            order = steppers if round_index % 2 == 0 else steppers[::-1]  # neither always goes first
            for stepper in order:
                times[steppers.index(stepper)].append(timed_steps(stepper, args.steps))
        ratios = [o / c for c, o in zip(*times)]
        for name, series in ((clip_name, times[0]), (open_name, times[1])):
            rows.append({"pair": pair, "model": name, "batch": batch, "seconds_per_step": statistics.median(series),
                         "ratio_median": statistics.median(ratios) if series is times[1] else 1.0,
                         "ratio_min": min(ratios) if series is times[1] else 1.0,
                         "ratio_max": max(ratios) if series is times[1] else 1.0})
        print(f"{pair}: clip-anytorch {statistics.median(times[0]) * 1e3:.1f} ms/step, open_clip "
              f"{statistics.median(times[1]) * 1e3:.1f} ms/step (batch {batch}); open_clip / clip-anytorch "
              f"median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
              f"{args.rounds} rounds)")
    if args.csv:
        path = Path(args.csv)
        fresh = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            fields = ["pair", "model", "batch", "seconds_per_step", "ratio_median", "ratio_min", "ratio_max"]
            if fresh:
                writer.writerow(["date", "commit", "machine", "command", *fields])
            command = "python scripts/bench_backends.py " + " ".join(sys.argv[1:])
            for row in rows:
                writer.writerow([datetime.date.today().isoformat(), commit(), machine(), command,
                                 *(f"{row[f]:.4g}" if isinstance(row[f], float) else row[f] for f in fields)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
