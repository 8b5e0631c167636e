"""What the trackers cost a training step: the same training run without trackers and with
``--report-to tensorboard,wandb`` (W&B offline), timed in interleaved rounds in one process.

Each round runs every configuration once, from a fresh folder, as ``python -m mtil.main`` would (in-process); the
time measured is the training loop alone (``train_steps``: the steps, their progress lines and the trackers'
scalars), not the start-up (W&B starts a service process once per run) or the evaluations. The median over rounds
of seconds per step, and the ratio to the run without trackers, are what to read:

    python scripts/bench_trackers.py --model toyclip --steps 200 --log-every 1 --rounds 5
    python scripts/bench_trackers.py --model ViT-B/32 --steps 12 --log-every 1 --rounds 3

``--log-every 1`` is the worst case (every step sends its scalars); the default of mtil is 50.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGURATIONS = {"no trackers": [], "tensorboard + wandb": ["--report-to", "tensorboard,wandb"]}


def timed_run(argv: list[str]) -> tuple[float, int]:
    """Run mtil once; the seconds its training loops took and the steps they made."""
    import mtil.engine.sequence as sequence
    from mtil.main import main

    original, spent = sequence.train_steps, {"seconds": 0.0, "steps": 0}

    def timed(run, task, *args, **kwargs):
        start_step, start = run.state.step, time.perf_counter()
        original(run, task, *args, **kwargs)
        spent["seconds"] += time.perf_counter() - start
        spent["steps"] += run.state.step - start_step

    sequence.train_steps = timed
    try:
        if main(argv) != 0:
            raise SystemExit(f"mtil failed: {' '.join(argv)}")
    finally:
        sequence.train_steps = original
    return spent["seconds"], spent["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toyclip")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (one task)")
    parser.add_argument("--log-every", type=int, default=1, help="steps between progress lines / tracker scalars")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    untrained = [] if args.model == "toyclip" or Path(args.model).is_file() else ["--untrained"]
    common = ["--model", args.model, *untrained, "--train-dataset", "ToyShape", "--iterations", str(args.steps),
              "--batch-size", str(args.batch_size), "--log-every", str(args.log_every), "--device", args.device,
              "--workers", "0", "--max-evaluation-size", "8", "--checkpoint-interval", "0",
              "--keep-checkpoints", "none"]
    per_step: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(args.rounds + 1):  # round 0 warms up (imports, first W&B service)
            for name, extra in CONFIGURATIONS.items():
                save = Path(tmp) / f"{round_number}-{len(extra)}"
                seconds, steps = timed_run([*common, *extra, "--save", str(save)])
                if round_number:
                    per_step[name].append(seconds / steps)
            print(f"round {round_number}: " + ", ".join(f"{n} {v[-1] * 1000:.2f} ms/step" for n, v in per_step.items()
                                                        if v and round_number), file=sys.stderr)
    base = statistics.median(per_step["no trackers"])
    import torch

    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps, --log-every {args.log_every}, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print("| configuration | ms / step | × no trackers |")
    print("| --- | --- | --- |")
    for name, values in per_step.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.2f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
