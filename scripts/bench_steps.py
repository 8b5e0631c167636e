"""Side-by-side training-step benchmark: fine-tuning against ZSCL with 1 000 and 15 000 reference sentences.

ZSCL's reference images are ToyCaptions renderings (20 000 of them, so the few steps here never draw one twice and
the teacher encodes every reference batch); "teacher rows cached" runs the same ZSCL step over a reference set of
one batch, drawn again at every step, so after the warm-up round the teacher's features all come from
``--ref-feature-cache``: the steady state of a reference set that is redrawn (README: Distillation).

Every configuration is built once (as training runs it: the method and the components its flags turn on, on
in-memory random images), then the steps are timed in interleaved rounds (one step of each configuration per
round), so the machine's load drifts alike over all of them; the ratios are what to read:

    python scripts/bench_steps.py --model ViT-B/32 --batch-size 8 --rounds 6
    python scripts/bench_steps.py --model ViT-B/16 --batch-size 64 --device cuda --precision bf16

Prints each configuration's median seconds per step, its ratio to fine-tuning, and ZSCL's 15 000 / 1 000 ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import prepare, timed  # noqa: E402

from mtil.datasets.toyworld import ToyCaptionDataset  # noqa: E402

ZSCL = ["--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions"]
# The paper's full ZSCL recipe adds weight ensembling and L2 (README: Methods); fine-tuning is the plain baseline.
CONFIGURATIONS = {
    "finetune": ("finetune", []),
    "ZSCL 1k sentences": ("ZSCL", [*ZSCL, "--ref-sentences-count", "1000"]),
    "ZSCL 15k sentences": ("ZSCL", [*ZSCL, "--ref-sentences-count", "15000"]),
    "ZSCL full recipe (WE, L2), 1k": ("ZSCL", [*ZSCL, "--ref-sentences-count", "1000", "--we", "--avg-freq", "100",
                                               "--l2", "1"]),
    "ZSCL 1k, teacher rows cached": ("ZSCL", [*ZSCL, "--ref-sentences-count", "1000", "--ref-feature-cache", "on"]),
}
REDRAWN = {"ZSCL 1k, teacher rows cached"}  # reference set of one batch: every image redrawn at every step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (after 1 warm-up round)")
    args = parser.parse_args()

    steps = args.rounds + 1
    built = {}
    for label, (method, flags) in CONFIGURATIONS.items():
        sizes = dict(ToyCaptionDataset.default_sizes)
        if label in REDRAWN:
            ToyCaptionDataset.default_sizes["train"] = args.batch_size
        try:
            step, description, device = prepare(method, args.model, "whole", args.batch_size, args.device, 100,
                                                steps, [*flags, "--precision", args.precision])
        finally:
            ToyCaptionDataset.default_sizes.clear()
            ToyCaptionDataset.default_sizes.update(sizes)
        built[label] = (step, device)
        print(f"{label}: {description}", flush=True)
    times: dict[str, list[float]] = {label: [] for label in built}
    for round_index in range(steps):
        for label, (step, device) in built.items():
            seconds = timed(step, device)
            if round_index > 0:
                times[label].append(seconds)
    base = statistics.median(times["finetune"])
    print(f"\nmodel {args.model}, batch {args.batch_size}, precision {args.precision}, threads "
          f"{torch.get_num_threads()}, median of {args.rounds} interleaved rounds:")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"  {label:<32} {median:8.4f} s/step   x{median / base:5.2f} of fine-tuning   "
              f"(min {min(values):.4f}, max {max(values):.4f})")
    flat = statistics.median(times["ZSCL 15k sentences"]) / statistics.median(times["ZSCL 1k sentences"])
    print(f"  ZSCL 15k / 1k sentences: x{flat:.3f}")


if __name__ == "__main__":
    main()
