"""Seeded, class-balanced evaluation subsets (never the first batches of a class-ordered loader)."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np


def balanced_sample(targets: Sequence[int], max_size: int, seed: int = 0) -> list[int]:
    """Indices of at most ``max_size`` items, spread as evenly over classes as the data allows.

    Classes are filled round-robin in a seeded random order, so small classes give all they have and the rest of
    the budget goes to larger ones. Returned indices are sorted (sequential reads are faster on disk).
    """
    if max_size >= len(targets):
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(targets):
        by_class[int(label)].append(index)
    pools = [list(rng.permutation(members)) for _, members in sorted(by_class.items())]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < max_size:
        order = rng.permutation(len(pools))
        for c in order:
            if depth < len(pools[c]) and len(chosen) < max_size:
                chosen.append(int(pools[c][depth]))
        depth += 1
    return sorted(chosen)
