"""What the trackers cost a training step: the same training run without trackers and with
``--report-to tensorboard,wandb`` (W&B offline), timed in interleaved rounds in one process.

Each round runs every configuration once, from a fresh folder, as ``python -m mtil.main`` would (in-process); the
time measured is the training loop alone (``train_steps``: the steps, their progress lines and the trackers'
scalars), not the start-up (W&B starts a service process once per run) or the evaluations. The median over rounds
of seconds per step, the median of each round's ratio to the run without trackers, and the time spent inside
the trackers' calls (measured directly, so free of the machine's noise; W&B's service process, which works beside
the run, shows only in the ratio) are what to read:

    python scripts/bench_trackers.py --model toyclip --steps 200 --log-every 1 --rounds 5
    python scripts/bench_trackers.py --model ViT-B/32 --steps 12 --log-every 1 --rounds 3

``--log-every 1`` is the worst case (every step sends its scalars); the default of mtil is 50.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGURATIONS = {"no trackers": [], "tensorboard + wandb": ["--report-to", "tensorboard,wandb"]}


def timed_run(argv: list[str]) -> tuple[float, float, int]:
    """Run mtil once; the seconds its training loops took, the seconds of those spent handing records to the
    trackers (in this process: W&B's service process works beside it), and the steps made."""
    import mtil.engine.sequence as sequence
    from mtil.main import main
    from mtil.records.owner import Records

    original, hand_over = sequence.train_steps, Records._to_trackers
    spent = {"seconds": 0.0, "trackers": 0.0, "steps": 0}

    def timed(run, task, *args, **kwargs):
        start_step, start = run.state.step, time.perf_counter()
        original(run, task, *args, **kwargs)
        spent["seconds"] += time.perf_counter() - start
        spent["steps"] += run.state.step - start_step

    def timed_hand_over(self, step, values):
        start = time.perf_counter()
        hand_over(self, step, values)
        spent["trackers"] += time.perf_counter() - start

    sequence.train_steps, Records._to_trackers = timed, timed_hand_over
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own lines (progress, tables) are not the figures
            code = main(argv)
        if code != 0:
            raise SystemExit(f"mtil failed: {' '.join(argv)}")
    finally:
        sequence.train_steps, Records._to_trackers = original, hand_over
    return spent["seconds"], spent["trackers"], spent["steps"]


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
    in_trackers: list[float] = []  # seconds per step inside the trackers' calls (with trackers)
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(args.rounds + 1):  # round 0 warms up (imports, first W&B service)
            for name, extra in CONFIGURATIONS.items():
                save = Path(tmp) / f"{round_number}-{len(extra)}"
                seconds, trackers, steps = timed_run([*common, *extra, "--save", str(save)])
                if round_number:
                    per_step[name].append(seconds / steps)
                    if extra:
                        in_trackers.append(trackers / steps)
            if round_number:
                print(f"round {round_number}: " + ", ".join(f"{n} {v[-1] * 1000:.2f} ms/step"
                                                            for n, v in per_step.items()), file=sys.stderr)
    import torch

    base, with_trackers = per_step["no trackers"], per_step["tensorboard + wandb"]
    paired = sorted(t / b for t, b in zip(with_trackers, base))
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps, --log-every {args.log_every}, "
          f"{args.device}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print("| configuration | ms / step (median) | × no trackers (median of the rounds' ratios, range) |")
    print("| --- | --- | --- |")
    print(f"| no trackers | {statistics.median(base) * 1000:.2f} | 1 |")
    print(f"| tensorboard + wandb | {statistics.median(with_trackers) * 1000:.2f} | "
          f"{statistics.median(paired):.3f} ({paired[0]:.3f}–{paired[-1]:.3f}) |")
    share = statistics.median(in_trackers) / statistics.median(base)
    print(f"time inside the trackers' calls: {statistics.median(in_trackers) * 1000:.3f} ms per step "
          f"({100 * share:.2f} % of a step without trackers)")


if __name__ == "__main__":
    main()
