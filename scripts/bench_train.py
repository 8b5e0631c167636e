"""Benchmark training: seconds per iteration and peak memory for a method, model, batch size and device.

Runs the real method code (its loss, backward, AdamW step and hooks) on in-memory random images at the model's
resolution, so the figure is the training step itself, not data loading:

    python scripts/bench_train.py --method finetune --model ViT-B/16 --batch-size 32 --device auto
"""
from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from mtil.args import build_parser
from mtil.datasets.base import TaskData
from mtil.engine.run import Run, TaskContext
from mtil.engine.state import TrainingState
from mtil.engine.tasks import TaskSpec, task_settings
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.methods import build_method
from mtil.models.clip_loading import load_clip, resolve_device
from mtil.models.train_modes import parameters_of, select_trainable


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="finetune")
    parser.add_argument("--model", default="ViT-B/16")
    parser.add_argument("--train-mode", default="whole")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("extra", nargs="*", help="further mtil flags for the method, e.g. --ls 0.2")
    args = parser.parse_args()

    config = build_parser().parse_args(["--method", args.method, "--train-mode", args.train_mode,
                                        "--batch-size", str(args.batch_size), "--workers", "0", *args.extra])
    device = resolve_device(args.device)
    loaded = load_clip(args.model, untrained=True, device=device, seed=0)
    model = loaded.model
    resolution = model.visual.input_resolution
    images = torch.randn(args.batch_size, 3, resolution, resolution)
    labels = torch.randint(0, args.classes, (args.batch_size,))
    data = TaskData("bench", [f"class {i}" for i in range(args.classes)], ["a photo of a {}."],
                    {"train": lambda: TensorDataset(images, labels), "test": lambda: TensorDataset(images, labels)})
    evaluator = ZeroShotEvaluator(model)
    run = Run(config, model, loaded.arch, device, TrainingState(sequence=["bench"]), evaluator, None,
              logging.getLogger("bench"))
    method = build_method(config)
    total = args.steps + 2
    task = TaskContext("bench", task_settings(config, TaskSpec("bench", {"iterations": total})), data,
                       total_steps=total)
    run.task = task
    select_trainable(model, config.train_mode, config.freeze)
    method.before_task(run, task)
    params = parameters_of([model, *method.extra_modules(run, task)])
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batch = (images.to(device), labels.to(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        losses = method.loss(run, batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        method.after_backward(run)
        optimizer.step()
        method.after_step(run)

    times = []
    for i in range(total):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    print(f"method={args.method} model={args.model} mode={args.train_mode} batch={args.batch_size} device={device}")
    print(f"seconds per iteration: {per_step:.4f} (median of {args.steps}); {args.batch_size / per_step:.1f} images/s")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"peak process RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
