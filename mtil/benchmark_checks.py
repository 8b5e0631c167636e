"""What the built-in benchmark must show, checked on a demo's mean ± std table (``mtil.demo``,
``scripts/bench_toyworld.py``).

1. Every task is learned: right after training it, fine-tuning's accuracy is at least chance + 40 points.
2. Fine-tuning loses most of the zero-shot ability: its Transfer is below the zero-shot model's by more than
   three of its standard deviations over seeds, and it keeps less than half of that Transfer above chance.
3. ZSCL keeps clearly more: its Transfer exceeds fine-tuning's by more than three standard deviations (the
   larger of the two methods' spreads over seeds) ...
4. ... without paying for it in Last: its Last is at most 5 points below fine-tuning's (above is allowed: a method
   that forgets less can end higher, as in the paper).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from mtil.datasets.toyworld import TASKS

LEARNED_MARGIN = 40.0
KEEPS_AT_MOST = 0.5
STD_GAP = 3.0
LAST_WITHIN = 5.0


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: {self.detail}"


def chance(task: str) -> float:
    return 100.0 / len(TASKS[task].classes)


def chance_transfer(order: list[str]) -> float:
    """The Transfer of a model at chance on every task (Transfer averages the columns after the first)."""
    return statistics.fmean(chance(t) for t in order[1:])


def check_rows(rows: list[dict], order: list[str]) -> list[Check]:
    by = {r["method"]: r for r in rows}
    checks = []
    if "finetune" in by:
        ft = by["finetune"]
        short = [f"{t.removeprefix('Toy')} {ft[f'diag_{t}']:.1f} (chance {chance(t):.0f})" for t in order]
        learned = all(ft[f"diag_{t}"] >= chance(t) + LEARNED_MARGIN for t in order)
        checks.append(Check("every task learned by fine-tuning (>= chance + 40)", learned, ", ".join(short)))
    if "finetune" in by and "zeroshot" in by:
        ft, zs = by["finetune"], by["zeroshot"]
        floor = chance_transfer(order)
        kept = (ft["transfer"] - floor) / max(zs["transfer"] - floor, 1e-9)
        gap = zs["transfer"] - ft["transfer"]
        spread = max(ft["transfer_std"], 0.1)
        checks.append(Check("fine-tuning loses most of the zero-shot Transfer",
                            kept < KEEPS_AT_MOST and gap > STD_GAP * spread,
                            f"{ft['transfer']:.1f} vs the zero-shot model's {zs['transfer']:.1f}: gap {gap:.1f} = "
                            f"{gap / spread:.1f} std; keeps {kept:.0%} of it above chance ({floor:.1f})"))
    if "finetune" in by and "ZSCL" in by:
        ft, zscl = by["finetune"], by["ZSCL"]
        spread = max(ft["transfer_std"], zscl["transfer_std"], 0.1)
        gap = zscl["transfer"] - ft["transfer"]
        checks.append(Check("ZSCL keeps clearly more Transfer than fine-tuning", gap > STD_GAP * spread,
                            f"{zscl['transfer']:.1f} vs {ft['transfer']:.1f}: gap {gap:.1f} = "
                            f"{gap / spread:.1f} std (std {spread:.2f})"))
        checks.append(Check("at a Last no more than 5 points below fine-tuning's",
                            zscl["last"] >= ft["last"] - LAST_WITHIN, f"{zscl['last']:.1f} vs {ft['last']:.1f}"))
    return checks
