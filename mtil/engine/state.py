"""TrainingState: the counters a checkpoint or a signal handler needs to know where a run stands."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

_KINDS = {"list[str]": list, "int": int, "bool": bool, "dict": dict}  # of the annotations below


@dataclass
class TrainingState:
    """Where a sequence run stands.

    ``sequence`` lists every task of the run in order, including tasks finished by earlier processes of a
    one-task-per-process chain (``completed`` holds those and this run's finished ones).
    """

    sequence: list[str]
    completed: list[str] = field(default_factory=list)
    step: int = 0  # optimiser steps done in the current task
    total_steps: int = 0  # steps the current task runs
    global_step: int = 0  # optimiser steps over all tasks
    zero_shot_evaluated: bool = False
    task_evaluated: bool = True  # the last completed task's matrix row is written
    base: dict = field(default_factory=dict)  # how to rebuild the zero-shot weights (see resume.base_spec)
    nonfinite_skipped: int = 0  # steps the numerical guard skipped (--skip-nonfinite), over the whole run
    warmup: int = -1  # warm-up steps of the task in progress (-1: not decided yet, or a checkpoint of an older mtil)

    @property
    def task_index(self) -> int:
        """Index (in ``sequence``) of the task in progress or next to train."""
        return len(self.completed)

    @property
    def current_task(self) -> str | None:
        return self.sequence[self.task_index] if self.task_index < len(self.sequence) else None

    @property
    def finished(self) -> bool:
        return self.task_index >= len(self.sequence) and self.task_evaluated

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingState":
        """The state a checkpoint recorded; a TypeError when an entry is missing, unknown or of another type."""
        state = cls(**d)
        for f in fields(cls):
            value = getattr(state, f.name)
            if f.type in _KINDS and not isinstance(value, _KINDS[f.type]):
                raise TypeError(f"{f.name} is {type(value).__name__}, not {f.type}")
        return state
