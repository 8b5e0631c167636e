"""``python -m mtil.main ... --seeds 1,2,3``: the same command once per seed, then the mean ± std over the seeds.

Seed S runs as ``python -m mtil.main <the command without --seeds> --seed S [--fewshot-seed S] --save
<save>/seed<S>`` (``--fewshot-seed`` only under ``--shots``: one seed for the draw and the training, as CoOp's
``--seed``), one after the other, skipping a seed that finished and resuming one that was interrupted. The tables
go to ``<save>/seeds_results.csv`` (one row per seed and dataset), ``seeds_summary.csv`` and ``seeds_summary.md``
(mean ± std per dataset, with the shot count).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtil.sweep import tables
from mtil.sweep.cli import finish, report_outcome
from mtil.sweep.command import BaseCommand, Planner, without_flags
from mtil.sweep.grid import SEED_AXIS, Point
from mtil.sweep.runner import Runner


def run_seeds(args: argparse.Namespace) -> int:
    """Run every seed of ``args.seeds`` (checked first, nothing written before), then write the tables."""
    argv = without_flags(list(args._argv), ("--seeds", "--save"))
    if args.max_evaluation_size is not None and args.eval_sample_seed is None:  # one sample for every seed
        argv += ["--eval-sample-seed", str(args.seeds[0])]
    base = BaseCommand([sys.executable, "-m", "mtil.main"], argv, True)
    planner = Planner(base, [], seeds=True)
    save = Path(args.save)
    commands = [planner.command(Point({}, seed), save / f"seed{seed}") for seed in args.seeds]
    print(f"mtil: {len(commands)} runs, one per seed ({', '.join(map(str, args.seeds))}), under {save}/seed<S>/",
          flush=True)
    outcomes = Runner(commands, 1, report_outcome, stop_on_failure=True).run()
    shots = {"shots": str(args.shots)} if args.shots is not None else {}
    rows = tables.collect([({**shots, **c.point.columns}, c.point.name, c.save, o.status)
                           for c, o in zip(commands, outcomes)])
    keys = [*shots, SEED_AXIS]
    summary, files = tables.write_tables(save, rows, keys, [SEED_AXIS], stem="seeds_")
    if summary:
        print(f"\nMean ± std over seeds {', '.join(map(str, args.seeds))} ({files[1]}):\n"
              f"{tables.markdown(summary, list(shots))}")
    return finish(outcomes, "mtil", "seed")
