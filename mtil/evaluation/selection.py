"""Choosing hyper-parameters: on validation data only, never on the test split (the protocol of the few-shot
papers; Tip-Adapter-F once chose its epoch on test data). Anything in mtil that selects calls these."""
from __future__ import annotations

import argparse
import math
from typing import Any, Iterable

from mtil.errors import UserError

SELECTION_SPLITS = ("val",)


def check_selection_split(split: str) -> str:
    """``split`` if hyper-parameters may be chosen on it (``val``); ``test`` is refused with the reason."""
    if split == "test":
        raise UserError(
            "choosing hyper-parameters on the test split is refused: it makes the reported test accuracy "
            "optimistic; select on val (min(K, 4) images per class drawn from the training split, with --shots)")
    if split not in SELECTION_SPLITS:
        raise UserError(f"hyper-parameters are chosen on {' or '.join(SELECTION_SPLITS)}, not {split!r}")
    return split


def selection_split(text: str) -> str:
    """:func:`check_selection_split` as an argparse type (argparse names the flag)."""
    try:
        return check_selection_split(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def best(rows: Iterable[dict[str, Any]], split: str = "val") -> dict[str, Any] | None:
    """The row with the highest ``split`` accuracy (the first such row on a tie; rows without it never win)."""
    check_selection_split(split)
    chosen = None
    for row in rows:
        value = row.get(split)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if chosen is None or value > chosen[split]:
            chosen = row
    return chosen
