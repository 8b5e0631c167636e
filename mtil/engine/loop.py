"""The one training loop: named loss terms from every component, then the hooks, for exactly N steps."""
from __future__ import annotations

import re
import sys
import time
import warnings
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from mtil.engine.data_stream import batch_stream
from mtil.engine.method import Method, ordered
from mtil.engine.numerics import NonFiniteError, NonFiniteGuard
from mtil.engine.preemption import Preempted, StopFlag
from mtil.evaluation.metrics_io import short_name
from mtil.engine.run import Run, TaskContext

REPORT_EVERY = 10  # steps between progress-bar updates of the loss terms (reading a loss waits for the GPU)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """A line every ``--log-every`` steps, on stdout whether or not it is a terminal (SLURM logs), and in
    train.log: loss terms, learning rate, images per second and the task's ETA over the last window."""

    def __init__(self, run: Run, task: TaskContext, every: int, show: bool = True):
        self.run, self.task, self.every = run, task, every if show else 0
        self.bar = tqdm(total=task.total_steps, initial=run.state.step, desc=task.name, dynamic_ncols=True,
                        disable=None if show else True, leave=False)
        self._mark(run.state.step)

    def _mark(self, step: int) -> None:
        self.window_step, self.window_time = step, time.perf_counter()

    def step(self, losses: dict[str, torch.Tensor], lr: float) -> None:
        state, task = self.run.state, self.task
        self.bar.update(1)
        last = state.step >= task.total_steps
        line_due = self.every and (state.step % self.every == 0 or last)
        if not (line_due or state.step % REPORT_EVERY == 0 or last):
            return
        values = {k: v.item() for k, v in losses.items()}
        self.bar.set_postfix({**{k: f"{v:.4f}" for k, v in values.items()}, "lr": f"{lr:.2e}"}, refresh=False)
        if not line_due:
            return
        steps = state.step - self.window_step
        seconds = time.perf_counter() - self.window_time
        rate = steps * task.settings.batch_size / seconds if seconds > 0 else float("nan")
        eta = (task.total_steps - state.step) * seconds / steps if steps else 0.0
        line = (f"[{short_name(task.name)}] step {state.step}/{task.total_steps}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
                + f"  lr {lr:.2e}  {rate:.1f} img/s  ETA {_duration(eta)}")
        if self.run.records is not None:  # the same numbers to the trackers, against the global step
            self.run.records.scalars(state.global_step, {**{f"train/{k}": v for k, v in values.items()},
                                                         "train/lr": lr, "train/images_per_s": rate,
                                                         "train/task": state.task_index + 1})
        self.bar.write(line, file=sys.stdout)
        sys.stdout.flush()
        self.run.log.info(line)
        self._mark(state.step)

    def close(self) -> None:
        self.bar.close()


def component_losses(run: Run, components: Sequence[Method], batch) -> dict[str, torch.Tensor]:
    """Every component's named loss terms of ``batch``, under ``--precision`` autocast."""
    losses: dict[str, torch.Tensor] = {}
    with run.autocast():
        for component in components:
            for name, value in component.loss(run, batch).items():
                if name in losses:
                    raise RuntimeError(f"two components both return a loss named {name!r}")
                losses[name] = value
    return losses


def optimization_step(run: Run, hooks: dict[str, list[Method]], optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None, batch, guard: NonFiniteGuard | None = None,
                      where: str = "", compute: Callable | None = None) -> dict[str, torch.Tensor]:
    """One step: every component's named loss terms (under ``--precision`` autocast), their float32 sum, backward
    (scaled for fp16, the gradients unscaled before the hooks see them), the numerical guard, ``after_backward``
    hooks, the optimiser step (none when the guard skips a non-finite step). Returns the loss terms. ``hooks``:
    hook name -> the components in that hook's order. ``compute`` (batch -> loss terms): how the terms are
    computed, e.g. through DistributedDataParallel (default: :func:`component_losses` directly)."""
    losses = compute(batch) if compute is not None else component_losses(run, hooks["loss"], batch)
    total = sum(value.float() for value in losses.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        total.backward()
    else:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)  # hooks (e.g. OGD's projection) see the true gradients
    if guard is not None:
        gradients = None if scaler is not None else [p.grad for group in optimizer.param_groups
                                                     for p in group["params"] if p.grad is not None]
        problem = guard.problem(losses, total, gradients)
        if run.parallel.any(problem is not None, run.device) and problem is None:  # every rank skips together
            problem = "another process's loss is not finite"
        if problem is not None and guard.allow_skip(problem, where):
            run.log.warning(f"{where}: {problem}; step skipped ({guard.skipped} of --skip-nonfinite "
                            f"{guard.limit} used)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # closes this step's unscale_ so the next step may scale again
            return losses
    for component in hooks["after_backward"]:
        component.after_backward(run)
    try:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        # e.g. AdamW's step size lr / (1 - beta1^t) beyond float32 (--lr 3e38): the update itself is not finite,
        # and the optimiser may have changed some of its state already, so the step cannot be skipped cleanly
        lr = max(group["lr"] for group in optimizer.param_groups)
        raise NonFiniteError(f"{where}: the optimiser's update is not finite (lr {lr:.3g}: {exc}); stopped, the "
                             f"checkpoints already written are kept (lower --lr)") from None
    return losses


def train_steps(run: Run, task: TaskContext, components: Sequence[Method], stream_id: int, *,
                stop: StopFlag, save_latest: Callable[[], None],
                evaluate_mid_task: Callable[[], None] | None = None) -> None:
    """Run the task's remaining steps (``run.state.step .. task.total_steps-1``); none for a zero-step task.

    Saves the latest checkpoint every ``--checkpoint-interval`` steps, and on a stop request (then raises
    :class:`Preempted`). Each step: sum of all components' named loss terms (under ``--precision`` autocast,
    summed in float32), backward (scaled for fp16, gradients unscaled before the hooks see them),
    ``after_backward`` hooks, optimiser and scheduler step, ``after_step`` hooks.
    """
    config, state = run.config, run.state
    if state.step >= task.total_steps:
        return
    hooks = {hook: ordered(list(components), hook) for hook in ("loss", "after_backward", "after_step")}
    raw, transform, collate = components[0].train_items(run, task)
    parallel = run.parallel
    loader = batch_stream(raw, transform, batch_size=task.settings.batch_size, seed=config.seed, stream=stream_id,
                          start_step=state.step, total_steps=task.total_steps, workers=config.workers,
                          pin_memory=run.device.type == "cuda", collate_fn=collate, rank=parallel.rank,
                          world=parallel.world_size)
    compute = None
    if parallel.distributed:  # gradients averaged over the ranks during backward (mtil.parallel)
        trained = [p for group in task.optimizer.param_groups for p in group["params"]]
        compute = parallel.wrap_losses(lambda batch: component_losses(run, hooks["loss"], batch), trained,
                                       run.device)
    run.model.train()
    progress = Progress(run, task, config.log_every, show=parallel.is_main)
    optimizer, scaler = task.optimizer, task.scaler
    if scaler is not None:  # fp16: a step whose gradients overflowed is skipped by design, not a misuse
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
    try:
        guard = NonFiniteGuard(config.skip_nonfinite, state.nonfinite_skipped)
        for batch in loader:
            losses = optimization_step(run, hooks, optimizer, scaler, batch, guard,
                                       where=f"{task.name} step {state.step + 1}/{task.total_steps}",
                                       compute=compute)
            state.nonfinite_skipped = guard.skipped
            task.scheduler.step()
            state.step += 1
            state.global_step += 1
            for component in hooks["after_step"]:
                component.after_step(run)

            progress.step(losses, task.scheduler.get_last_lr()[0])
            last = state.step >= task.total_steps
            if (evaluate_mid_task and config.eval_interval and not last
                    and state.step % config.eval_interval == 0):
                evaluate_mid_task()
            if parallel.any(stop.requested, run.device) and not last:  # every rank votes: all stop together
                save_latest()
                raise Preempted(f"stopped by {stop.signal_name or 'another process'} at {task.name} step "
                                f"{state.step}")
            if config.checkpoint_interval and not last and state.step % config.checkpoint_interval == 0:
                save_latest()
    finally:
        progress.close()
