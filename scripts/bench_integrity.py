"""What verifying a checkpoint costs: reading a ViT-B/32 checkpoint (its weights and AdamW's two moments, as a
mid-task ``latest.pth`` holds them: 1.8 GB) with a plain ``torch.load`` against mtil's verified read (every
tensor against its checksum, the pickle against its zip CRC), and writing it with and without the checksums.

The payload is built from a randomly initialised ViT-B/32 (no weights are needed: the cost depends on the bytes,
not their values) and written once by mtil's own ``save_checkpoint``. The two reads run in interleaved rounds in
one process, from the page cache (the harshest case for verification: reading from a disk makes the load slower
and the check, done in memory, a smaller share):

    python scripts/bench_integrity.py --model ViT-B/32 --rounds 9
    python scripts/bench_integrity.py --model tiny-vit --rounds 3     # a quick check that it runs

``--csv FILE`` appends the figures as rows (date, commit, machine, command), for docs/results/.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtil.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mtil.models.architectures import ALL_ARCHITECTURES  # noqa: E402
from mtil.models.clip_loading import build_clip  # noqa: E402
from mtil.tensor_files import checksums  # noqa: E402


def checkpoint_payload(model_name: str) -> dict:
    """A mid-task checkpoint's bulk: the model's weights and AdamW's state after one step."""
    model = build_clip(ALL_ARCHITECTURES[model_name], seed=0)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "state": {"step": 1}}


def timed(function) -> float:
    gc.collect()
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    del result
    gc.collect()
    return seconds


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32", choices=sorted(ALL_ARCHITECTURES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--folder", default=None, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--csv", default=None, help="append the figures to this CSV file")
    args = parser.parse_args()
    payload = checkpoint_payload(args.model)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        verified, plain = Path(tmp) / "latest.pth", Path(tmp) / "plain.pth"
        save_plain = timed(lambda: torch.save({"format": "mtil-checkpoint", "version": 1, **payload}, plain))
        save_verified = timed(lambda: save_checkpoint(verified, payload))
        summing = timed(lambda: checksums(payload))
        del payload
        size = verified.stat().st_size
        reads: dict[str, list[float]] = {"torch.load": [], "verified": []}
        for round_number in range(args.rounds + 1):  # round 0 warms the page cache and the allocator
            first = timed(lambda: torch.load(verified, map_location="cpu", weights_only=True))
            second = timed(lambda: load_checkpoint(verified))
            if round_number:
                reads["torch.load"].append(first)
                reads["verified"].append(second)
                print(f"round {round_number}: torch.load {first:.3f} s, verified {second:.3f} s", file=sys.stderr)
    ratios = sorted(v / p for v, p in zip(reads["verified"], reads["torch.load"]))
    plain_read, verified_read = statistics.median(reads["torch.load"]), statistics.median(reads["verified"])
    command = "python scripts/bench_integrity.py " + " ".join(sys.argv[1:])
    print(f"{args.model} checkpoint with AdamW state: {size / 1e9:.2f} GB, {args.rounds} interleaved rounds, "
          f"page cache, {machine()}")
    print("| read | s (median) | × torch.load (median of the rounds' ratios, range) |")
    print("| --- | --- | --- |")
    print(f"| torch.load(weights_only=True), unverified | {plain_read:.3f} | 1 |")
    print(f"| mtil load_checkpoint, verified | {verified_read:.3f} | {statistics.median(ratios):.3f} "
          f"({ratios[0]:.3f}–{ratios[-1]:.3f}) |")
    print(f"write: torch.save {save_plain:.2f} s, save_checkpoint with checksums and fsync {save_verified:.2f} s "
          f"(one write each; the checksums alone {summing:.2f} s)")
    if args.csv:
        path = Path(args.csv)
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["date", "commit", "machine", "command", "model", "gigabytes", "operation",
                                 "seconds_median", "ratio_median", "ratio_min", "ratio_max"])
            stamp = [datetime.date.today().isoformat(), commit(), machine(), command, args.model, f"{size / 1e9:.3f}"]
            writer.writerow([*stamp, "torch.load", f"{plain_read:.4f}", 1, 1, 1])
            writer.writerow([*stamp, "verified", f"{verified_read:.4f}", f"{statistics.median(ratios):.4f}",
                             f"{ratios[0]:.4f}", f"{ratios[-1]:.4f}"])
            writer.writerow([*stamp, "checksums at save", f"{summing:.4f}", "", "", ""])


if __name__ == "__main__":
    main()
