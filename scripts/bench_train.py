"""Benchmark training: seconds per iteration and peak memory for a method, model, batch size and device.

Runs the real method code (the method and every component its flags turn on, their losses, backward, the
optimiser step and the hooks in their declared order, under ``--precision``) on in-memory random images at the
model's resolution, so the figure is the training step itself, not data loading:

    python scripts/bench_train.py --method finetune --model ViT-B/16 --batch-size 32 --device auto
    python scripts/bench_train.py --method ZSCL --model tiny-vit -- --ref-dataset ToyCaptions \
        --ref-sentences ToyCaptions --precision bf16 --l2 1
"""
from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from mtil import registry
from mtil.args import parse_args
from mtil.datasets.base import TaskData
from mtil.engine.loop import optimization_step
from mtil.engine.numerics import NonFiniteGuard
from mtil.engine.method import ordered
from mtil.engine.optim import build_optimizer, parameter_groups
from mtil.engine.precision import grad_scaler, resolve_precision
from mtil.engine.run import Run, TaskContext
from mtil.engine.state import TrainingState
from mtil.engine.tasks import TaskSpec, task_settings
from mtil.errors import UserError
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.models.clip_loading import load_clip, resolve_device
from mtil.models.train_modes import select_trainable


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(method: str, model_name: str, train_mode: str, batch_size: int, device_name: str, classes: int,
            steps: int, extra: list[str]):
    """Build one training configuration as training runs it; returns (step function, description, device)."""
    try:  # the flags through mtil's own checks (a method's flags, combinations, ranges)
        config = parse_args(["--method", method, "--train-mode", train_mode, "--train-dataset", "bench",
                             "--iterations", str(steps), "--batch-size", str(batch_size), "--workers", "0", *extra])
    except UserError as exc:
        raise SystemExit(f"bench_train: error: {exc}") from None
    device = resolve_device(device_name)
    loaded = load_clip(model_name, untrained=True, device=device, seed=0)
    model = loaded.model
    resolution = model.visual.input_resolution
    images = torch.randn(batch_size, 3, resolution, resolution)
    labels = torch.randint(0, classes, (batch_size,))
    data = TaskData("bench", [f"class {i}" for i in range(classes)], ["a photo of a {}."],
                    {"train": lambda: TensorDataset(images, labels), "test": lambda: TensorDataset(images, labels)})
    evaluator = ZeroShotEvaluator(model)
    precision = resolve_precision(config.precision, device)
    run = Run(config, model, loaded.arch, device, TrainingState(sequence=["bench"]), evaluator, None,
              logging.getLogger("bench"), precision=precision)
    components = registry.build_components(config)
    for component in components:
        component.check_inputs()
        component.check_model(model)
    settings = task_settings(config, TaskSpec("bench", {"iterations": steps}))
    task = TaskContext("bench", settings, data, total_steps=steps)
    run.task = task
    select_trainable(model, config.train_mode, config.freeze)
    if components[0].trains_logit_scale:
        model.logit_scale.requires_grad_(True)
    for component in ordered(components, "before_task"):
        component.before_task(run, task)
    extra_modules = [m for c in components for m in c.extra_modules(run, task)]
    groups = parameter_groups(model, extra_modules, settings.lr, config.lr_multipliers)
    for component in ordered(components, "parameter_groups"):  # the method's, then each component's (as the engine)
        groups = component.parameter_groups(run, task, groups)
    optimizer = components[0].optimizer(run, task, groups) or build_optimizer(config.optimizer, groups, settings,
                                                                                config.momentum)
    scaler = grad_scaler(precision, device)
    hooks = {h: ordered(components, h) for h in ("loss", "after_backward", "after_step")}
    batch = (images.to(device), labels.to(device))

    def step() -> None:
        optimization_step(run, hooks, optimizer, scaler, batch, NonFiniteGuard(0))  # as training runs it
        run.state.step += 1
        for component in hooks["after_step"]:
            component.after_step(run)

    description = (f"method={method} ({', '.join(c.name for c in components)}) model={model_name} mode={train_mode} "
                   f"batch={batch_size} device={device} precision={precision} threads={torch.get_num_threads()}")
    return step, description, device


def timed(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


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

    total = args.steps + 2
    step, description, device = prepare(args.method, args.model, args.train_mode, args.batch_size, args.device,
                                        args.classes, total, args.extra)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed(step, device) for _ in range(total)][2:]
    per_step = statistics.median(times)
    print(description)
    print(f"seconds per iteration: {per_step:.4f} (median of {args.steps}); {args.batch_size / per_step:.1f} images/s")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"peak process RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
