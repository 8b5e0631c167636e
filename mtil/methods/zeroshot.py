"""``--method zeroshot``: train nothing. Every task has zero steps, so the run writes the zero-shot model's
accuracy matrix, summary and checkpoints in the same files as a training run: the "zero-shot CLIP" control row of
an MTIL table (Transfer = the zero-shot accuracy of every dataset but the first, Avg = Last = their mean)."""
from __future__ import annotations

from mtil.engine.method import Method
from mtil.registry import register


@register
class ZeroShot(Method):
    name = "zeroshot"
    summary = "no training: the zero-shot control row of the accuracy matrix"
    training_free = True
    works_with = ()
