"""The one-process-per-task chain's matrix, completed: each link evaluates its new tasks under the earlier rows'
weights, so the chain ends with the matrix (and Transfer) of the same sequence run in one process.

A link of a chain (``--load`` of the previous link's task checkpoint, the same ``--save``) learns of its tasks only
when it starts; the earlier links evaluated the tasks they knew. Before it trains, a link evaluates each of its
tasks that an earlier row lacks under that row's weights: the zero-shot weights for row 0, the task checkpoint
``<save>/<Dataset>.pth`` for row k (kept by ``--keep-checkpoints all``, the default). A task not yet trained is
classified by its zero-shot head (text prompts), as the in-process run does in those rows. Rows whose weights are
gone, or a model whose trained weights are not plain CLIP weights (LoRA adapters), are left as they are, with a
note.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mtil.engine.checkpoint import load_checkpoint
from mtil.engine.run import Run
from mtil.evaluation import fewshot_report
from mtil.evaluation.metrics_io import safe_name, task_checkpoint_path
from mtil.models.lora import has_lora
from mtil.records.files import MATRIX, read_or_rebuild_matrix, result_record


def missing_cells(long, rows: int, datasets: list[str]) -> dict[int, list[str]]:
    """after_task -> the datasets of ``datasets`` that row lacks, for rows 0 .. rows-1."""
    have = set() if long is None else {(int(r.after_task), str(r.dataset)) for r in long.itertuples()}
    return {row: [d for d in datasets if (row, d) not in have] for row in range(rows)
            if any((row, d) not in have for d in datasets)}


def fill_earlier_rows(run: Run, folder: Path, datasets: list[str], first_task: str, records, method: str,
                      say: Callable[[str], None]) -> int:
    """Evaluate ``datasets`` (this link's tasks) in the rows before the link's ``first_task`` of the matrix in
    ``folder`` that lack them (every process reads the folder, so all take part in the evaluations); returns the
    cells filled. Idempotent: a link resumed after a kill fills what the first attempt had not."""
    state = run.state
    rows = state.sequence.index(first_task) + 1  # row 0 (zero-shot) .. row k (the earlier links' last task)
    matrix = folder / MATRIX
    missing = missing_cells(read_or_rebuild_matrix(matrix) if matrix.is_file() else None, rows, datasets)
    if not missing:
        return 0
    if has_lora(run.model):
        say(f"mtil: note: the earlier rows lack {', '.join(datasets)}; with LoRA adapters in the model they are "
            f"not evaluated here (give every task to --eval-datasets in each link instead)")
        return 0
    current = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    part = fewshot_report.matrix_part(run.evaluator.fewshot)
    filled = 0
    try:
        for row, names in sorted(missing.items()):
            weights, iteration = _row_weights(run, folder, row)
            if weights is None:
                say(f"mtil: note: row {row} of the matrix lacks {', '.join(names)} and its weights "
                    f"({safe_name(state.sequence[row - 1])}.pth) are not kept: --keep-checkpoints all keeps them")
                continue
            run.model.load_state_dict({**current, **weights})
            run.evaluator.model_changed(text_changed=True)
            cells = []
            for name in names:
                result = run.evaluator.evaluate(name, "test", part)
                records.evaluation(result_record(
                    dataset=name, iteration=iteration, after_task=row, sequence=state.sequence[:row], top1=result.top1,
                    top5=result.top5, images=result.count, classes=result.classes, part=part, head=result.head,
                    method=method), row)
                cells.append({"after_task": row, "dataset": name, "top1": result.top1, "top5": result.top5})
            records.matrix_cells(cells, list(state.sequence))
            filled += len(cells)
            say(f"[row {row}, filled for the chain] " + "  ".join(f"{c['dataset']} {c['top1']:.2f}" for c in cells))
    finally:
        run.model.load_state_dict(current)
        run.evaluator.model_changed(text_changed=True)
    return filled


def _row_weights(run: Run, folder: Path, row: int) -> tuple[dict[str, torch.Tensor] | None, int]:
    """The weights of a row of the matrix and the global step it was evaluated at."""
    if row == 0:
        return dict(run.zeroshot_state()), 0
    path = task_checkpoint_path(folder, run.state.sequence[row - 1])
    if not path.is_file():
        return None, 0
    payload = load_checkpoint(path)
    return payload["model"], int(payload.get("iteration", 0))
