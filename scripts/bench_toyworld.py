"""Check that the built-in benchmark shows continual learning with seeds and an order other than the demo's.

Runs the zero-shot control, fine-tuning and ZSCL (as ``make demo`` runs them) over ``--seeds`` on ``--order``
(default: the demo's order rotated by one, its last task first), prints the mean ± std table and the checks of ``mtil.benchmark_checks``
(every task learned; fine-tuning forgets the zero-shot ability; ZSCL keeps clearly more at a close Last), and
exits 1 when one fails.

    python scripts/bench_toyworld.py                        # seeds 3,4,5, the rotated order (about 8 min, 2 cores)
    python scripts/bench_toyworld.py --order ToyWorld --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mtil import demo  # noqa: E402
from mtil.benchmark_checks import check_rows  # noqa: E402


def rotated(order: list[str]) -> list[str]:
    """The order with its last task moved to the front: every task sits at another place, and what came before
    it changes (README, "Benchmarks", says why not the reverse)."""
    return order[-1:] + order[:-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", default=",".join(rotated(demo.order_of("ToyWorld"))),
                        help="ToyWorld or a comma list of tasks (default: the demo's order rotated by one, its "
                             "last task first)")
    parser.add_argument("--seeds", default="3,4,5")
    parser.add_argument("--methods", default="zeroshot,finetune,ZSCL")
    parser.add_argument("--out", default="ckpt/bench_toyworld")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in demo.METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown[0]!r}; choose from {', '.join(demo.METHODS)}")
    out = Path(args.out) / args.order.replace(",", "-")
    result = demo.experiment(out, methods, seeds, args.order, args.parallel)
    if result is None:
        return 1
    rows, tasks = result
    demo.write_outputs(out, rows, tasks)
    checks = check_rows(rows, tasks)
    print("\n" + "\n".join(c.line() for c in checks))
    return 0 if checks and all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
