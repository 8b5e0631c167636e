"""Benchmark training: seconds per step and peak memory of one or several methods, for a model, batch size and device.

Each configuration is built as training builds it (mtil's parser and checks, the method and every component its
flags turn on, the task's hooks in the engine's order, the engine's optimiser, schedule and numerical guard) on a
task whose training split is held in memory as raw PIL images of random pixels; then the engine's own
``optimization_step`` runs ``--steps`` timed steps after ``--warmup`` untimed ones:

    python scripts/bench_train.py --method finetune --model ViT-B/16 --batch-size 32 --device auto
    python scripts/bench_train.py --method ZSCL --model tiny-vit -- --ref-dataset ToyCaptions \\
        --ref-sentences ToyCaptions --precision bf16 --l2 1
    python scripts/bench_train.py --methods finetune,ZSCL,lwf,lwf-vr,icarl --model ViT-B/32 --batch-size 8 \\
        --steps 3 --device cpu

Timed, as a training step runs it: every component's loss terms (under ``--precision``), their backward, the
``after_backward`` hooks (e.g. OGD's projection), the numerical guard, the optimiser and scheduler step and the
``after_step`` hooks (e.g. weight averaging, EMA). For the distillation methods that includes drawing the step's
*reference* batch, since the method draws it inside its loss: the next batch of its reference stream (with the
bench's default ``--workers 0``: reading the raw images and running the reference transform -- resize, centre
crop, to tensor, normalise -- in the step), its copy to the device, then the teacher's and the student's forward
passes on it. ZSCL's reference images (ToyCaptions here) are rendered by the toy renderer (32 px, resized to the
model's resolution); LwF's and LwF-VR's are the task's own raw training images; iCaRL's are its exemplars, a
subset of those. The raw images are in-memory PIL images, so no file is read or decoded. With ``-- --workers N``
the reference batches come from N loader processes, as in a training run with that flag, and only waiting for
them is timed.

Not timed: the *training* batch's loading. It is drawn once from the method's own training stream (its raw items,
train transform and collate, as training draws them), moved to the device, and reused by every step. Nor the
set-up: building the model, the teachers (ZSCL's zero-shot weights are rebuilt on the CPU as training does), the
reference sentence features (``before_task``), iCaRL's exemplar selection, AST's stage 1.

iCaRL distils on an exemplar memory, which a previous task leaves behind: the bench first runs a task
``bench-previous`` (the same in-memory images under another name) through the engine's task hooks with no
training steps, so iCaRL's ``after_task`` fills its memory by herding (one feature pass over that task's
``--images`` images; the memory holds min(``--memory-size``, ``--images``) exemplars); the timed task is the
second one, whose every step distils on a batch of exemplars over the previous task's class prompts (the
description line says how many exemplars, and the loss terms the step computed). ``--previous-task on`` runs that
zero-step previous task for any method (``auto``: for iCaRL only).

``--methods`` measures each method in its own fresh process (so the peak RSS is that method's) and prints a
table: the median seconds per step over the timed steps, training images per second (a distillation step encodes
its reference batch too), the process's peak RSS (``getrusage`` ``ru_maxrss``: the whole process, set-up
included, as a training run's peak would be) and, on CUDA, ``torch.cuda.max_memory_allocated`` over the warm-up
and timed steps (its counter is reset after set-up). A method that fails gets a row with its error and the exit
status is 1. Flags after ``--`` go to every method; the per-method defaults below come first (a later flag wins)
and ``--flags-for METHOD='FLAGS'`` replaces a method's defaults (``--no-method-defaults``: none):

* ZSCL: ``--ref-dataset ToyCaptions --ref-sentences ToyCaptions --ref-sentences-count 1000`` (its own defaults,
  ImageNet and Conceptual Captions, are files this bench does not ship);
* every other method: none (LwF-VR: its default 5 000 random-token sentences; iCaRL: ``--memory-size`` 2000).

``contrastive`` trains on ToyCaptions (captions are its labels). Training-free methods (``zeroshot``,
``tip-adapter``, ``tip-adapter-f``, ``tip-x``) have no training step: they are reported as such, not timed.

Caveats: in a first task ``--orthogonal-gradients`` only records gradients (no basis to project on yet; give one
with ``-- --orthogonal-gradients-path FILE`` to time the projection); ``--raw-size`` sets the side of the raw
images (default: the model's resolution, so the resize is nearly free; real datasets' larger images cost more).
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtil import registry
from mtil.args import parse_args
from mtil.datasets import registry as dataset_registry
from mtil.datasets.base import TaskData
from mtil.datasets.captions import CAPTION_DATASETS
from mtil.datasets.fewshot import task_data
from mtil.engine.data_stream import batch_stream
from mtil.engine.loop import optimization_step
from mtil.engine.method import ordered, run_after_task, run_before_task
from mtil.engine.numerics import NonFiniteGuard
from mtil.engine.optim import build_optimizer, parameter_groups
from mtil.engine.precision import configure_matmul, grad_scaler, resolve_precision
from mtil.engine.run import Run, TaskContext
from mtil.engine.schedule import warmup_cosine
from mtil.engine.sequence import ZeroShotWeights
from mtil.engine.state import TrainingState
from mtil.engine.tasks import TaskSpec, task_settings
from mtil.errors import UserError
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.hardware import set_threads
from mtil.models.clip_loading import build_clip, load_clip, resolve_device
from mtil.models.train_modes import select_trainable
from mtil.seeding import seed_everything

BENCH_TASK = "bench"  # the timed task
PREVIOUS_TASK = "bench-previous"  # the task before it, when one is run (iCaRL's exemplars come from it)
CAPTION_TASK = CAPTION_DATASETS[0]  # the task of methods that train on captions (contrastive)
NEEDS_PREVIOUS_TASK = {"icarl": "its exemplar memory is filled at the end of a task"}
METHOD_DEFAULTS = {
    "ZSCL": ["--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions", "--ref-sentences-count", "1000"],
}
RESULT_PREFIX = "bench_train result: "  # the line a --result-line child prints for its parent
TEMPLATES = ["a photo of a {}."]


class TrainingFree(Exception):
    """The method trains nothing (its tasks have zero steps): there is no step to time."""


class RawImages(Dataset):
    """(PIL image, label) pairs of random pixels held in memory: a dataset opener's raw split, minus the disk."""

    def __init__(self, count: int, size: int, classes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
        self.targets = rng.integers(0, classes, count).tolist()  # read by targets_of without touching the images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def register_bench_datasets(names: list[str], count: int, size: int, classes: int) -> None:
    """Make ``names`` datasets mtil opens by name (as iCaRL and joint open their tasks), all over the same
    in-memory images; a name registered earlier in this process is replaced and its cached opening dropped."""
    images = RawImages(count, size, classes)
    classnames = [f"class {i}" for i in range(classes)]
    for name in names:
        data = TaskData(name, classnames, TEMPLATES, {"train": lambda: images, "test": lambda: images})
        dataset_registry.register(name, "in memory (scripts/bench_train.py)", downloadable=False)(
            lambda location, download, data=data: data)
        for key in [k for k in dataset_registry._OPEN if k[0] == name]:
            del dataset_registry._OPEN[key]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(item, device) for item in batch)
    return batch


def _start_task(run: Run, components: list, name: str, steps: int) -> TaskContext:
    """The engine's task start (mtil.engine.sequence): the task's data, trainable parameters, ``before_task``."""
    config, method = run.config, components[0]
    data = task_data(config, name) if method.needs_classification_data else None
    task = TaskContext(name, run.task_settings[name], data, total_steps=steps)
    run.task = task
    instead = any(c.trains_instead_of_clip for c in components)  # e.g. LoRA: --freeze names adapters
    select_trainable(run.model, config.train_mode, None if instead else config.freeze)
    if method.trains_logit_scale:
        run.model.logit_scale.requires_grad_(True)
    run.state.step, run.state.total_steps = 0, steps
    run_before_task(run, task, components)
    return task


def _finish_task(run: Run, components: list, task: TaskContext) -> None:
    run_after_task(run, task, components)
    run.state.completed.append(task.name)
    run.state.step = 0
    run.task = None


def prepare(method: str, model_name: str, train_mode: str, batch_size: int, device_name: str, classes: int,
            steps: int, extra: list[str], *, images: int | None = None, raw_size: int | None = None,
            previous_task: str = "auto"):
    """Build one training configuration as training runs it; returns (step function, description, device).

    ``steps``: every step the caller will run (warm-up included; the task's length and its reference streams').
    ``images``: raw training images of the task (default: twice the batch). ``previous_task``: on, off or auto
    (on for the methods in NEEDS_PREVIOUS_TASK). Raises TrainingFree for a method without training steps.
    """
    try:
        method_class = registry.method_class(method)
    except UserError as exc:
        raise SystemExit(f"bench_train: error: {exc}") from None
    if method_class.training_free:
        raise TrainingFree(f"--method {method} is training-free (its tasks have zero steps): no training step "
                           f"to time")
    captions = not method_class.needs_classification_data
    before = previous_task == "on" or (previous_task == "auto" and method in NEEDS_PREVIOUS_TASK)
    sequence = [CAPTION_TASK] if captions else ([PREVIOUS_TASK, BENCH_TASK] if before else [BENCH_TASK])
    try:  # the flags through mtil's own checks (a method's flags, combinations, ranges)
        config = parse_args(["--method", method, "--train-mode", train_mode, "--train-dataset", ",".join(sequence),
                             "--iterations", str(steps), "--batch-size", str(batch_size), "--workers", "0", *extra])
    except UserError as exc:
        raise SystemExit(f"bench_train: error: {exc}") from None
    set_threads(config.threads)
    device = resolve_device(device_name)
    configure_matmul(device, config.deterministic)
    seed_everything(config.seed)
    loaded = load_clip(model_name, untrained=True, device=device, seed=0)
    model = loaded.model
    resolution = model.visual.input_resolution
    count = images or 2 * batch_size
    if not captions:
        register_bench_datasets(sequence, count, raw_size or resolution, classes)
    precision = resolve_precision(config.precision, device)
    run = Run(config, model, loaded.arch, device, TrainingState(sequence=sequence), ZeroShotEvaluator(model), None,
              logging.getLogger("bench"), precision=precision)
    run.zeroshot_state = ZeroShotWeights({"model": model_name, "clip_root": None, "untrained": True, "load": None,
                                          "seed": 0}, config)  # as the runner's: rebuilt on the CPU on first use
    run.task_settings = {name: task_settings(config, TaskSpec(name)) for name in sequence}
    components = registry.build_components(config)
    try:
        for component in components:
            component.check_inputs()
            with torch.device("meta"):  # the engine's twin: a component may modify the model it checks
                twin = build_clip(loaded.arch)
            component.check_model(twin)
    except UserError as exc:
        raise SystemExit(f"bench_train: error: {exc}") from None
    notes = []
    if before:  # the previous task: its hooks with no training steps (iCaRL selects its exemplars at its end)
        _finish_task(run, components, _start_task(run, components, PREVIOUS_TASK, 0))
        memory = getattr(components[0], "memory", None)
        if isinstance(memory, dict):
            notes.append(f"exemplar memory {sum(map(len, memory.values()))} images")
        notes.append(f"after {PREVIOUS_TASK}")
    task = _start_task(run, components, sequence[-1], steps)
    settings = task.settings
    extra_modules = [m for c in components for m in c.extra_modules(run, task)]
    groups = parameter_groups(model, extra_modules, settings.lr, config.lr_multipliers)
    for component in ordered(components, "parameter_groups"):  # the method's, then each component's (as the engine)
        groups = component.parameter_groups(run, task, groups)
    optimizer = components[0].optimizer(run, task, groups) or build_optimizer(config.optimizer, groups, settings,
                                                                                config.momentum)
    scheduler = warmup_cosine(optimizer, settings.warmup_length, steps)
    scaler = grad_scaler(precision, device)
    hooks = {h: ordered(components, h) for h in ("loss", "after_backward", "after_step")}
    raw, transform, collate = components[0].train_items(run, task)  # one batch of the method's own stream
    loader = batch_stream(raw, transform, batch_size=batch_size, seed=config.seed, stream=run.state.task_index,
                          start_step=0, total_steps=1, workers=0, pin_memory=False, collate_fn=collate)
    batch = _to_device(next(iter(loader)), device)
    guard = NonFiniteGuard(config.skip_nonfinite)
    run.model.train()

    def step() -> None:  # as mtil.engine.loop.train_steps runs one
        losses = optimization_step(run, hooks, optimizer, scaler, batch, guard)
        step.loss_terms = list(losses)  # what the step computed (e.g. the distillation terms), for the report
        scheduler.step()
        run.state.step += 1
        run.state.global_step += 1
        for component in hooks["after_step"]:
            component.after_step(run)

    description = (f"method={method} ({', '.join(c.name for c in components)}) model={model_name} "
                   f"mode={config.train_mode} batch={batch_size} device={device} precision={precision} "
                   f"threads={torch.get_num_threads()} task images={len(raw)}" + "".join(f"; {n}" for n in notes))
    return step, description, device


def timed(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib() -> float:
    """This process's peak resident set (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def measure(args: argparse.Namespace, method: str, extra: list[str]) -> dict[str, Any]:
    """One method in this process: its result as a dict (``skipped`` for a training-free method)."""
    try:
        step, description, device = prepare(method, args.model, args.train_mode, args.batch_size, args.device,
                                            args.classes, args.warmup + args.steps, extra, images=args.images,
                                            raw_size=args.raw_size, previous_task=args.previous_task)
    except TrainingFree as exc:
        return {"method": method, "skipped": str(exc)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed(step, device) for _ in range(args.warmup + args.steps)][args.warmup:]
    per_step = statistics.median(times)
    return {"method": method, "description": description, "loss_terms": getattr(step, "loss_terms", []),
            "seconds_per_step": per_step, "steps": args.steps,
            "times": times, "images_per_second": args.batch_size / per_step, "peak_rss_gib": peak_rss_gib(),
            "peak_cuda_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def print_single(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(f"bench_train: {result['skipped']}")
        return
    print(result["description"])
    print(f"loss terms: {', '.join(result['loss_terms'])}")
    print(f"seconds per iteration: {result['seconds_per_step']:.4f} (median of {result['steps']}); "
          f"{result['images_per_second']:.1f} images/s")
    if result["peak_cuda_gib"] is not None:
        print(f"peak GPU memory: {result['peak_cuda_gib']:.2f} GiB")
    print(f"peak process RSS: {result['peak_rss_gib']:.2f} GiB")


def method_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    """``--flags-for METHOD='FLAGS'`` (repeatable) over METHOD_DEFAULTS."""
    flags = {m: list(f) for m, f in METHOD_DEFAULTS.items()} if not args.no_method_defaults else {}
    for entry in args.flags_for:
        method, sep, text = entry.partition("=")
        if not sep or not method:
            raise SystemExit(f"bench_train: error: --flags-for {entry!r}: expected METHOD='FLAGS'")
        flags[method] = shlex.split(text)
    return flags


def child_command(args: argparse.Namespace, method: str, extra: list[str]) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--method", method, "--model", args.model,
               "--train-mode", args.train_mode, "--batch-size", str(args.batch_size), "--device", args.device,
               "--classes", str(args.classes), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--previous-task", args.previous_task, "--result-line"]
    if args.images is not None:
        command += ["--images", str(args.images)]
    if args.raw_size is not None:
        command += ["--raw-size", str(args.raw_size)]
    return command + ["--", *extra]


def run_child(args: argparse.Namespace, method: str, extra: list[str]) -> dict[str, Any]:
    """One method in a fresh process; its result line, or its error."""
    command = child_command(args, method, extra)
    print(f"[{method}] {shlex.join(command[1:])}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    sys.stderr.write(done.stderr)
    return {"method": method, "error": f"exit {done.returncode}: {lines[-1].strip() if lines else 'no output'}"}


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    cuda = any(r.get("peak_cuda_gib") is not None for r in results)
    header = ["method", "s / step", "images / s", "peak process RSS"] + (["peak CUDA allocated"] if cuda else [])
    print(f"\nmodel {args.model}, batch {args.batch_size}, mode {args.train_mode}, device {args.device}; median of "
          f"{args.steps} steps after {args.warmup} warm-up, one process per method:\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for r in results:
        if "seconds_per_step" in r:
            cells = [r["label"], f"{r['seconds_per_step']:.4f}", f"{r['images_per_second']:.1f}",
                     f"{r['peak_rss_gib']:.2f} GiB"]
            if cuda:
                cells.append(f"{r['peak_cuda_gib']:.2f} GiB" if r.get("peak_cuda_gib") is not None else "-")
        else:
            reason = "training-free: no step" if "skipped" in r else f"failed: {r.get('error')}"
            cells = [r["label"], reason] + [""] * (len(header) - 2)
        print("| " + " | ".join(cells) + " |")
    for r in results:
        if "description" in r:
            print(f"  {r['label']}: {r['description']}; loss terms: {', '.join(r['loss_terms'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default=None, help="one method, measured in this process (default finetune)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods, each measured in its own process, e.g. "
                             "finetune,ZSCL,lwf,lwf-vr,icarl; prints a table")
    parser.add_argument("--flags-for", action="append", default=[], metavar="METHOD='FLAGS'",
                        help="--methods: mtil flags of one method, replacing its defaults (repeatable)")
    parser.add_argument("--no-method-defaults", action="store_true",
                        help="--methods: no per-method default flags (ZSCL's reference data)")
    parser.add_argument("--model", default="ViT-B/16")
    parser.add_argument("--train-mode", default="whole")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--images", type=int, default=None,
                        help="raw training images of the task (default: twice the batch): LwF's reference images, "
                             "iCaRL's exemplar pool, AST's stage-1 epoch")
    parser.add_argument("--raw-size", type=int, default=None,
                        help="side of the raw images in pixels (default: the model's input resolution)")
    parser.add_argument("--previous-task", choices=["auto", "on", "off"], default="auto",
                        help="run a previous task's hooks (no steps) before the timed task (auto: for iCaRL)")
    parser.add_argument("--result-line", action="store_true", help=argparse.SUPPRESS)  # a --methods child
    parser.add_argument("extra", nargs="*", help="further mtil flags for the method(s), e.g. -- --ls 0.2")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")

    if args.methods is None:
        result = measure(args, args.method or "finetune", args.extra)
        if args.result_line:
            print(RESULT_PREFIX + json.dumps(result), flush=True)
        else:
            print_single(result)
        return

    if args.method is not None:
        parser.error("give --method (one, in this process) or --methods (several, one process each), not both")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        parser.error("--methods needs at least one method")
    unknown = [m for m in methods if m not in registry.method_names()]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; accepted: {', '.join(registry.method_names())}")
    flags = method_flags(args)
    results = []
    for method in methods:
        result = run_child(args, method, [*flags.get(method, []), *args.extra])
        result["label"] = method
        results.append(result)
    print_table(results, args)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
