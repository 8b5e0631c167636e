"""The α / β / γ grid search of Tip-Adapter and Tip-X, on validation features only.

Every combination of the grids is scored by top-1 accuracy on the validation queries; the best wins, ties going
to the lower mean cross-entropy of the validation labels and then to the earlier combination in grid order (each
grid sorted ascending, α outermost, then β, then γ), so the choice is deterministic and never depends on how the
values were typed. :func:`grid_search` refuses any split but ``val`` (:func:`check_selection_split`): the original
Tip-Adapter-F chose its epoch on test data.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mtil.adapters.tip import cache_logits, combine
from mtil.evaluation.selection import check_selection_split

GRID_MAX = 1000  # values per grid: a typo such as 0:1000 should not make a search of a billion points


def parse_grid(text: str) -> list[float]:
    """``'0.1, 1,3'`` -> ``[0.1, 1.0, 3.0]`` (an argparse type: finite numbers of 0 or more, sorted, distinct)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.1,1,3, got {text!r}")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {item!r} in {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"grid values must be finite numbers of 0 or more, got {item}")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a value appears twice in {text!r}")
    if len(values) > GRID_MAX:
        raise argparse.ArgumentTypeError(f"at most {GRID_MAX} values per grid, got {len(values)}")
    return sorted(values)


@dataclass(frozen=True)
class Choice:
    """One point of the grid and its validation scores."""

    alpha: float
    beta: float
    gamma: float
    top1: float  # % of the validation queries
    ce: float  # mean cross-entropy of the validation labels

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def grid_search(zero_shot: torch.Tensor, affinities: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
                alphas: Sequence[float], betas: Sequence[float], gammas: Sequence[float] = (0.0,),
                extra: torch.Tensor | None = None, split: str = "val") -> tuple[Choice, list[Choice]]:
    """The best (α, β, γ) for ``zero_shot + α · exp(−β (1 − affinities)) · values + γ · extra`` on ``labels``,
    and every point's scores (grid order). ``split`` names where the queries come from: only ``val`` is accepted.
    ``extra`` (Tip-X's term) is needed only when a γ is not 0."""
    check_selection_split(split)
    if extra is None and any(g != 0 for g in gammas):
        raise ValueError("a γ other than 0 needs the extra (Tip-X) term")
    if labels.numel() == 0:
        raise ValueError("no validation queries to search on")
    alphas, betas, gammas = sorted(alphas), sorted(betas), sorted(gammas)
    # float32, in the order TipHead computes: the accuracy found here is the one its evaluation gives
    zero_shot, labels = zero_shot.float(), labels.long()
    extra = extra.float() if extra is not None else None
    caches = {beta: cache_logits(affinities.float(), values.float(), beta) for beta in betas}
    table: list[Choice] = []
    for alpha in alphas:
        for beta in betas:
            for gamma in gammas:
                logits = combine(zero_shot, caches[beta], alpha, extra if gamma != 0 else None, gamma)
                top1 = 100.0 * (logits.argmax(dim=1) == labels).sum().item() / labels.numel()
                ce = F.cross_entropy(logits, labels).item()
                table.append(Choice(float(alpha), float(beta), float(gamma), top1, ce))
    best = min(range(len(table)), key=lambda i: (-table[i].top1, table[i].ce, i))
    return table[best], table
