"""Label spaces (``--label-space``): among which classes a test image is classified.

* ``dataset`` (the default, MTIL's): each test set among its own classes. A run that evaluates dataset d with d's
  head uses d's identity at test time (which classes are candidates), whatever the method.
* ``seen`` (task-agnostic, the X-TAIL way of RAIL, Xu et al. NeurIPS 2024): after training the tasks S, a test
  image of dataset d is classified among the classes of every task in S plus d's own. Each dataset's classes are
  their own slots (class i of dataset A and a same-named class of dataset B are two slots); a hit is the true
  (dataset, class) slot only. With S empty (the zero-shot row), or S = {d}, it is ``dataset``'s measure exactly.

The slot layout is :func:`union_datasets`: the seen tasks in training order, then d when it is not one of them.
The evaluator (:meth:`mtil.evaluation.zeroshot.ZeroShotEvaluator.evaluate`) builds the union head; a method with
its own task-agnostic head supplies it through :meth:`mtil.engine.method.Method.task_agnostic_head`.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from mtil.errors import UserError

LABEL_SPACES = ("dataset", "seen")
DEFAULT_LABEL_SPACE = "dataset"
SEEN = "seen"


def label_space_of(record: Mapping[str, Any]) -> str:
    """The label space a results.jsonl record was measured in (records written before the field: ``dataset``)."""
    value = record.get("label_space")
    return str(value) if value else DEFAULT_LABEL_SPACE


def records_label_space(records: Iterable[Mapping[str, Any]], where: str = "results.jsonl") -> str | None:
    """The one label space of the after-task records (the matrix's cells) of ``records``; None when there are none.
    Cells of two label spaces in one matrix are a UserError (one line)."""
    spaces = {label_space_of(r) for r in records if isinstance(r, Mapping) and r.get("after_task") is not None}
    if len(spaces) > 1:
        raise UserError(f"{where} mixes accuracy-matrix cells of label spaces {' and '.join(sorted(spaces))}: "
                        f"one matrix holds one label space (evaluate the other one into another folder)")
    return next(iter(spaces), None)


def summary_label(method: str, label_space: str | None) -> str:
    """What the summary, the tables and the heat map call a run: its label, with the label space when not the
    default (``finetune [label space: seen]``)."""
    if not label_space or label_space == DEFAULT_LABEL_SPACE:
        return method
    return f"{method} [label space: {label_space}]"


def seen_tasks(completed: Sequence[str]) -> list[str]:
    """The classification tasks among ``completed`` (a caption dataset of contrastive training has no classes)."""
    from mtil.datasets.captions import CAPTION_DATASETS

    return [name for name in completed if name not in CAPTION_DATASETS]


def union_datasets(dataset: str, seen: Sequence[str]) -> list[str]:
    """The slot layout of ``dataset``'s union head: the seen tasks in order (a repeat dropped), then ``dataset``
    itself when it is not one of them."""
    layout = list(dict.fromkeys(seen))
    return layout if dataset in layout else layout + [dataset]
