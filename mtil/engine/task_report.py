"""What each task of a run trains with, as config.yaml's comments and the start-up lines say it."""
from __future__ import annotations

import argparse
from typing import Sequence

from mtil.engine.run import TaskSettings
from mtil.engine.tasks import TaskSpec, overridden


def applied_settings(specs: Sequence[TaskSpec], settings: Sequence[TaskSettings]) -> dict[str, dict]:
    """dataset -> the per-task settings it trains with (those that are set)."""
    return {spec.dataset: {k: v for k, v in vars(s).items() if v is not None} for spec, s in zip(specs, settings)}


def settings_lines(config: argparse.Namespace, specs: Sequence[TaskSpec], settings: Sequence[TaskSettings],
                   training_free: bool) -> list[str]:
    """What each task trains with, where a sequence gave per-task values (and which typed flags won)."""
    lines = []
    for key, tasks in overridden(config, list(specs)).items():
        lines.append(f"note: --{key.replace('_', '-')} given on the command line (or in --config) replaces "
                     f"{config.train_dataset}'s per-task {key} ({', '.join(tasks)})")
    if any(spec.overrides for spec in specs) and not training_free:
        for spec, s in zip(specs, settings):
            length = f"{s.iterations} iterations" if s.iterations is not None else f"{s.epochs} epochs"
            lines.append(f"  {spec.dataset}: lr {s.lr:g}, {length}, batch {s.batch_size}")
    return lines
