"""The one training loop: named loss terms from every component, then the hooks, for exactly N steps."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm import tqdm

from mtil.engine.data_stream import batch_stream
from mtil.engine.preemption import Preempted, StopFlag
from mtil.engine.run import Run, TaskContext
from mtil.methods.base import Method


REPORT_EVERY = 10  # steps between progress-bar updates of the loss terms
LOG_EVERY = 50  # steps between log lines (a multiple of REPORT_EVERY)


def train_steps(run: Run, task: TaskContext, components: Sequence[Method], stream_id: int, *,
                stop: StopFlag, save_latest: Callable[[], None],
                evaluate_mid_task: Callable[[], None] | None = None) -> None:
    """Run the task's remaining steps (``run.state.step .. task.total_steps-1``).

    Saves the latest checkpoint every ``--checkpoint-interval`` steps, and on a stop request (then raises
    :class:`Preempted`). Each step: sum of all components' named loss terms, backward, ``after_backward``
    hooks, optimiser and scheduler step, ``after_step`` hooks.
    """
    config, state = run.config, run.state
    primary = components[0]
    raw, transform, collate = primary.train_items(run, task)
    loader = batch_stream(raw, transform, batch_size=task.settings.batch_size, seed=config.seed, stream=stream_id,
                          start_step=state.step, total_steps=task.total_steps, workers=config.workers,
                          pin_memory=run.device.type == "cuda", collate_fn=collate)
    run.model.train()
    bar = tqdm(total=task.total_steps, initial=state.step, desc=task.name, dynamic_ncols=True,
               disable=None, leave=False)
    try:
        for batch in loader:
            losses: dict[str, torch.Tensor] = {}
            for component in components:
                for name, value in component.loss(run, batch).items():
                    if name in losses:
                        raise RuntimeError(f"two components both return a loss named {name!r}")
                    losses[name] = value
            total = sum(losses.values())
            task.optimizer.zero_grad(set_to_none=True)
            total.backward()
            for component in components:
                component.after_backward(run)
            task.optimizer.step()
            task.scheduler.step()
            state.step += 1
            state.global_step += 1
            for component in components:
                component.after_step(run)

            bar.update(1)
            last = state.step >= task.total_steps
            # Reading a loss value waits for the GPU: do it every REPORT_EVERY steps, not every step.
            if state.step % REPORT_EVERY == 0 or last:
                values = {k: v.item() for k, v in losses.items()}
                lr = task.scheduler.get_last_lr()[0]
                bar.set_postfix({**{k: f"{v:.4f}" for k, v in values.items()}, "lr": f"{lr:.2e}"}, refresh=False)
                if state.step % LOG_EVERY == 0 or last:
                    run.log.info("%s step %d/%d %s lr %.3e", task.name, state.step, task.total_steps,
                                 " ".join(f"{k} {v:.4f}" for k, v in values.items()), lr)
            if (evaluate_mid_task and config.eval_interval and not last
                    and state.step % config.eval_interval == 0):
                evaluate_mid_task()
            if stop.requested and not last:
                save_latest()
                raise Preempted(f"stopped by {stop.signal_name} at {task.name} step {state.step}")
            if config.checkpoint_interval and not last and state.step % config.checkpoint_interval == 0:
                save_latest()
    finally:
        bar.close()
