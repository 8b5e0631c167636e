"""The built-in benchmark (``mtil.datasets.toyworld``) registered by name: needs no files."""
from __future__ import annotations

from mtil.datasets import toyworld
from mtil.datasets.base import TaskData
from mtil.datasets.registry import register

BENCHMARK_SEED = 0  # the benchmark is data: fixed, whatever --seed a run uses


def _open_toy_task(task: str) -> TaskData:
    info = toyworld.TASKS[task]
    return TaskData(task, list(info.classes), list(info.templates), {
        split: (lambda split=split: toyworld.ToyTaskDataset(task, split=split, seed=BENCHMARK_SEED))
        for split in ("train", "test")
    })


for _task_name in toyworld.TASKS:
    register(_task_name, "nothing (generated in memory)", downloadable=False)(
        lambda root, download, _t=_task_name: _open_toy_task(_t)
    )
