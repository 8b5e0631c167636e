"""The trainable weights as the current task began: one copy per run, shared by every component that needs it.

Why: L2 consolidation (``--l2``) pulls toward these weights, weight ensembling's ``--we-wise`` blends with them and
``--wise-merge --wise-ref start`` merges toward them. Each used to clone its own: ``--l2 1 --we --we-wise`` held two
device copies of the model's trainable weights (600 MB each for a ViT-B/16) and wrote both into every checkpoint.

How: the run owns one :class:`TaskStartWeights` (``Run.task_start``; ``Run.task_start_weights()`` returns the copy).

* The copy is taken lazily, at the first request, on the training device, and the same dict (the same tensors)
  is returned to every later caller during the task; no request, no copy.
* Requests belong in ``before_task`` hooks, before any weight moved. The engine resets the holder before the task's
  first ``before_task`` and seals it after the last, so a request that would copy weights that already trained is
  an error, not a silently wrong anchor. It resets it again after ``after_task``, so the copy is freed between
  tasks once the components let go of it (they drop their references in ``after_task``).
* A mid-task checkpoint holds the copy once (``task_start``). On a mid-task resume ``before_task`` has captured the
  *current* weights by the time the checkpoint is read, so :meth:`~TaskStartWeights.restore` copies the saved values
  into the shared tensors in place: every component holding the dict sees them. Checkpoints of an older mtil carry
  the copy in the components' states instead (L2's ``anchor``, WE's ``start``); those components restore it in
  place with :func:`copy_into` the same way.

The tensors are shared: no caller may modify them in place (apart from the restores above).
"""
from __future__ import annotations

from typing import Any

import torch

from mtil.engine.weights import clone, to_cpu, trainable_parameters

Weights = dict[str, torch.Tensor]


class TaskStartWeights:
    """One run's copy of the trainable weights as the current task began (see the module's docstring)."""

    def __init__(self) -> None:
        self._weights: Weights | None = None
        self._sealed = False

    def reset(self) -> None:
        """A task begins (or ended): forget the copy; the next request captures it anew."""
        self._weights, self._sealed = None, False

    def seal(self) -> None:
        """Every ``before_task`` ran: the weights may move from now on, so a first request now would be wrong."""
        self._sealed = True

    def get(self, model: torch.nn.Module) -> Weights:
        """The copy: captured from ``model``'s trainable parameters at the first call of the task, the same dict
        afterwards."""
        if self._weights is None:
            if self._sealed:
                raise RuntimeError("the task-start weights were first asked for after the task's before_task hooks "
                                   "(the weights may have trained since): ask for them in before_task")
            self._weights = clone(trainable_parameters(model))
        return self._weights

    def peek(self) -> Weights | None:
        """The copy if some component asked for it this task, else None (captures nothing)."""
        return self._weights

    def state_dict(self) -> Weights | None:
        """A CPU copy for a checkpoint, or None when nothing was captured."""
        return to_cpu(self._weights)

    def restore(self, saved: Weights | None) -> bool:
        """Copy a checkpoint's values into the captured tensors, in place; False when there was nothing to do."""
        if saved is None or self._weights is None:
            return False
        copy_into(self._weights, saved)
        return True


@torch.no_grad()
def copy_into(target: Weights, saved: Weights) -> None:
    """``target[name].copy_(saved[name])`` for every name of both: restores shared tensors in place."""
    for name, value in saved.items():
        if name in target:
            target[name].copy_(value)


def task_start_weights(run: Any) -> Weights:
    """The run's shared task-start weights (call it in ``before_task``). A stand-in run that has no engine holder (a
    unit test's, say) gets a private copy, as every component took before."""
    getter = getattr(run, "task_start_weights", None)
    return getter() if getter is not None else clone(trainable_parameters(run.model))


def shared_task_start(run: Any) -> Weights | None:
    """The run's task-start weights if a component already asked for them this task, else None (copies nothing)."""
    holder = getattr(run, "task_start", None)
    return holder.peek() if isinstance(holder, TaskStartWeights) else None
