"""The one small interface every training method and every component implements.

A *method* (``--method NAME``) computes the task's main loss; a *component* (L2, weight ensembling, EMA, WiSE
merge, LoRA, OGD) adds to any method when its flags ask for it. Both are subclasses of :class:`Method` in one file
of ``mtil/methods/``, registered with :func:`mtil.registry.register`; each declares

* its flags (:meth:`add_arguments`, added to the parser in its own argument group ``flag_group``),
* where it works: ``train_modes``; for a method, ``works_with`` (the components it combines with, ``None`` for
  all); for a component, ``conflicts`` (other components it cannot run with, and why),
* ``supports_distributed`` (whether it may run in several processes) and ``training_free`` (a task of zero steps),
* its place in the hook order: ``order`` (the method is always first), ``hook_order`` for a hook that must run
  elsewhere (LoRA injects early and merges late).

Hooks, in the order the engine calls them: ``check_config`` (flags alone), ``check_inputs`` (files it needs) and
``check_model`` (the built model) before anything is written or evaluated; then ``before_task`` once per task, per
step ``loss`` (named terms, summed by the loop), ``after_backward`` (e.g. gradient projection), ``after_step``
(e.g. weight averaging), and ``after_task``. ``state_dict``/``load_state_dict`` carry everything a resume needs; on
a resume mid-task ``load_state_dict`` is called *after* ``before_task``, so it overrides what ``before_task``
rebuilt. ``parameter_groups`` (the method's, then each component's in order) and ``optimizer`` (the
method's only) decide how its parameters are updated.

Test-time label spaces (``--label-space``, :mod:`mtil.evaluation.label_space`): under ``seen`` the evaluator
classifies a test image of dataset d among the classes of every task trained so far plus d's own, with the union
of those datasets' heads (zero-shot heads, and the linear heads a method learned). A method whose heads cannot
join such a union (an image encoding of their own, logits on a scale of their own) declares why in
``label_space_seen_refused``, and ``--label-space seen`` is refused before anything is written. A method with its
own task-agnostic inference (MoE-Adapters' DDAS routing, DIKI's calibration, RAIL's fusion) overrides
:meth:`Method.task_agnostic_head` instead.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from mtil.models.train_modes import TRAIN_MODES

if TYPE_CHECKING:  # only for type hints
    from mtil.engine.run import Run, TaskContext

HOOKS = ("before_task", "loss", "after_backward", "after_step", "after_task")


class Method:
    """Base class: a method or component overrides the declarations and hooks it needs; the defaults do nothing."""

    name: ClassVar[str] = "method"
    kind: ClassVar[str] = "method"  # or "component"
    summary: ClassVar[str] = ""  # one line for --help and the README
    enable_flag: ClassVar[str] = ""  # components: the flag that turns it on (for messages)
    flag_group: ClassVar[tuple[str, str] | None] = None  # (title, description) of this class's own flags
    train_modes: ClassVar[tuple[str, ...]] = TRAIN_MODES
    train_modes_note: ClassVar[str] = ""  # why the other modes are refused (for the message)
    works_with: ClassVar[tuple[str, ...] | None] = None  # methods: components it combines with (None: all)
    conflicts: ClassVar[dict[str, str]] = {}  # components: other component -> why they cannot run together
    requires: ClassVar[dict[str, str]] = {}  # own flag (dest) -> the flag (dest) it refines, which must be on
    order: ClassVar[float] = 0.0  # position in every hook (methods run first; components sort by this)
    hook_order: ClassVar[dict[str, float]] = {}  # hook -> position, where it differs from ``order``
    supports_distributed: ClassVar[bool] = False  # may run in several processes (torchrun / srun)
    training_free: ClassVar[bool] = False  # tasks have zero steps: no optimiser, no --iterations
    trains_instead_of_clip: ClassVar[bool] = False  # components: trains its own parameters, CLIP's frozen (LoRA)
    trains_logit_scale: ClassVar[bool] = False
    needs_classification_data: ClassVar[bool] = True
    # Why --label-space seen cannot evaluate this method ("" : it can): its heads cannot join a union of heads and
    # it supplies no task_agnostic_head. Said in the one-line refusal ("--method X <this>").
    label_space_seen_refused: ClassVar[str] = ""

    def __init__(self, config: argparse.Namespace):
        self.config = config

    # ------------------------------------------------------------------ declarations (class level)
    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this class's own flags to ``group`` (use :func:`mtil.flags.add_flag`, with the flag's roles)."""

    @classmethod
    def run_label(cls, config: argparse.Namespace) -> str | None:
        """This class's part of the run's label (``finetune+ema``, ``ZSCL+l2+we``); None: not named in it."""
        return cls.name

    @classmethod
    def enabled(cls, config: argparse.Namespace) -> bool:
        """Components: whether the flags ask for this component (a method is chosen by ``--method``)."""
        return False

    @classmethod
    def sets_task_length(cls, config: argparse.Namespace) -> bool:
        """Whether the method's own flags give every task's length (e.g. AST's ``--stage2-epochs``): then no
        ``--iterations``/``--epochs`` is required, and :meth:`task_steps` receives 0 for a task without one."""
        return False

    @classmethod
    def shared_batch_sizes(cls, config: argparse.Namespace) -> dict[str, int]:
        """The method's own batch sizes that several processes share out (flag -> size), besides the tasks'
        ``--batch-size``: each must be a multiple of the number of processes."""
        return {}

    @classmethod
    def check_config(cls, config: argparse.Namespace) -> None:
        """Refuse flag combinations of this class's own flags (a UserError); called only when it is active."""

    @classmethod
    def position(cls, hook: str) -> float:
        return -1.0 if cls.kind == "method" else cls.hook_order.get(hook, cls.order)

    # ------------------------------------------------------------------ checks before anything is written
    def check_inputs(self) -> None:
        """Refuse missing reference data now (a UserError), before anything is evaluated or written."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse settings that do not fit the model (a UserError), before anything is written. ``model`` is a
        twin with the run's structure on the meta device (names and shapes, no values), which may be modified."""

    # ------------------------------------------------------------------ training
    def train_items(self, run: "Run", task: "TaskContext") -> tuple[Dataset, Callable | None, Callable | None]:
        """(raw dataset, per-item transform, collate_fn) for this task's training stream (the method's)."""
        from mtil.models.transforms import train_transform
        from mtil.models.backend import image_spec

        return task.data.raw("train"), train_transform(image_spec(run.model)), None

    def task_steps(self, run: "Run", task: "TaskContext", steps: int) -> int:
        """How many optimiser steps this task trains; ``steps`` is its own length (``--iterations`` or
        ``--epochs``). A method may train some tasks not at all (0: no optimiser is built) or longer."""
        return steps

    def extra_modules(self, run: "Run", task: "TaskContext") -> list[nn.Module]:
        """Modules outside CLIP whose trainable parameters the optimiser also updates (e.g. a linear head)."""
        return []

    def parameter_groups(self, run: "Run", task: "TaskContext",
                         groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The method's say over the optimiser's parameter groups (default: the engine's groups, unchanged)."""
        return groups

    def optimizer(self, run: "Run", task: "TaskContext",
                  groups: list[dict[str, Any]]) -> torch.optim.Optimizer | None:
        """The method's own optimiser over ``groups``, or None for the engine's (``--optimizer``)."""
        return None

    def before_task(self, run: "Run", task: "TaskContext") -> None:
        pass

    def loss(self, run: "Run", batch: Any) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, run: "Run") -> None:
        pass

    def after_step(self, run: "Run") -> None:
        pass

    def after_task(self, run: "Run", task: "TaskContext") -> None:
        pass

    def task_agnostic_head(self, run: "Run", dataset: str, layout: list[str]) -> nn.Module | None:
        """``--label-space seen``: the head that classifies test images of ``dataset`` among the classes of every
        dataset of ``layout`` (the tasks trained so far in training order, then ``dataset`` when it is not one of
        them; at least two datasets: a one-dataset layout is ``dataset``'s own head), or None (the default) for the
        evaluator's union of the per-dataset heads. The head (a :class:`~mtil.models.heads.Head`) must give one
        logit per class of the layout's datasets, each dataset's classes a block of their own in layout order
        (the evaluator moves an image's label into its dataset's block). Its ``encode`` may be its own (e.g. routed
        adapters), with its own ``feature_id``. Called at every evaluation of a ``seen`` run (the method's state
        is the current one); only training runs ask it (``--eval-only`` refuses a method that overrides it)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def ordered(components: "list[Method]", hook: str) -> "list[Method]":
    """``components`` in the order ``hook`` runs them (stable: equal positions keep their order)."""
    return sorted(components, key=lambda c: type(c).position(hook))


def run_before_task(run: "Run", task: "TaskContext", components: "list[Method]") -> None:
    """Every ``before_task`` hook in order, between the resets of the run's shared task-start weights
    (:mod:`mtil.engine.task_start`): a component may first ask for them only here."""
    run.task_start.reset()
    for component in ordered(components, "before_task"):
        component.before_task(run, task)
    run.task_start.seal()  # weights move from here on: a first request now would copy trained weights


def run_after_task(run: "Run", task: "TaskContext", components: "list[Method]") -> None:
    """Every ``after_task`` hook in order; then the task-start copy is freed (the components let go of it)."""
    for component in ordered(components, "after_task"):
        component.after_task(run, task)
    run.task_start.reset()


class Component(Method):
    """A component: adds to any method when ``enabled(config)``; sorted by ``order`` in every hook."""

    kind = "component"
    order = 50.0


def run_label(components: list[Method], config: argparse.Namespace) -> str:
    """The method and the components that change what it computes, joined by '+': what summary.csv, the tables and
    the plots call the run (``finetune+ema``, ``ZSCL+l2+we``), so that such runs are told apart."""
    return "+".join(label for component in components if (label := type(component).run_label(config)))
