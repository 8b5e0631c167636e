"""``python -m mtil.sweep``: run a base command over a grid of flag values and seeds, resumably, into one table.

    python -m mtil.sweep --base "python -m mtil.main --model toyclip --train-dataset ToyColorB --iterations 50" \\
        --grid shots=1,2 --grid lr=1e-4,1e-3 --seeds 1,2,3 --out ckpt/sweep --select-on val

Every point is checked before the first one runs (see :mod:`mtil.sweep.command`); each runs with
``--save <out>/<point>``; re-running the same sweep skips the finished points and resumes an interrupted one.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

import yaml

from mtil.atomic import atomic_open
from mtil.errors import UserError, path_error
from mtil.evaluation.selection import selection_split
from mtil.flags import _OneLineParser, add_flag, name_list, positive_int, seed_list
from mtil.sweep import tables
from mtil.sweep.command import Planner, PointCommand, parse_base
from mtil.sweep.grid import (SEED_KEYS, VARIANT_AXIS, axes_from_file, check_axes, expand, normal_key, parse_axis,
                             parse_variant, seed_columns, variant_axis)
from mtil.sweep.runner import Outcome, Runner, is_finished, outcome_line

# Grid columns that define the protocol, not a hyper-parameter: by default one setting is chosen per value.
# The variant (a method and its flags) is one too: each is compared with its own best setting.
PROTOCOL_KEYS = (VARIANT_AXIS, "shots", "base-new", "train-dataset", "sequence", "eval-datasets")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m mtil.sweep", allow_abbrev=False,
                            description="Run a base command over a grid of flag values and seeds; resume; one table.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group(
        "Sweeps (python -m mtil.sweep)",
        "Run a base command once per point of a grid of flag values (and seeds), one --save folder per point "
        "under --out; finished points are skipped and an interrupted one resumes when the sweep runs again; one "
        "results table at the end (docs/guides/sweeps.md).")
    add_flag(g, "--base", required=True, metavar="COMMAND",
             help="The command every point runs, as one shell word, e.g. \"python -m mtil.main --model toyclip "
                  "--train-dataset ToyColorB --iterations 50\"; each point adds its flags and --save. An mtil "
                  "command's points are checked by mtil's parser before any runs.")
    add_flag(g, "--grid", type=parse_axis, action="append", default=None, metavar="FLAG=V1,V2,...",
             help="An axis of the grid: a flag and its values (repeat for more axes; the points are every "
                  "combination). Values separated by commas, or by semicolons when a value holds commas "
                  "(train-dataset=A,B;C). An on/off flag takes true,false.")
    add_flag(g, "--variant", type=parse_variant, action="append", default=None, metavar="NAME=FLAGS",
             help="A named bundle of flags, e.g. --variant 'zeroshot=--method zeroshot' --variant 'ast=--method "
                  "ast --lr 7e-4' (repeat per variant): the first axis of the grid, so methods whose flags differ "
                  "share one sweep and one table (the column 'variant').")
    add_flag(g, "--grid-file", default=None, metavar="YAML", path=True,
             help="Axes from a YAML file mapping flags to lists of values (lr: [1.0e-5, 1.0e-4]), before --grid's; "
                  "its 'variant:' maps variant names to flags, as --variant does.")
    add_flag(g, "--seeds", type=seed_list, default=None, metavar="S1,S2,...",
             help="Run every point once per seed, with --seed S and, when it uses --shots, --fewshot-seed S; the "
                  "summary averages over them.")
    add_flag(g, "--out", required=True, metavar="DIR", path=True,
             help="Folder of the sweep: one folder per point (named by its values, e.g. shots=2_lr=1e-4_seed1), "
                  "results.csv, summary.csv, summary.md, selected.csv.")
    add_flag(g, "--parallel", type=positive_int, default=1, metavar="N",
             help="Points run at a time (their output then goes to <point>/sweep.log only). On a CPU, add "
                  "--threads to the base command so that N runs do not oversubscribe the cores.")
    add_flag(g, "--select-on", type=selection_split, default=None, metavar="SPLIT",
             help="Choose the best setting by mean accuracy on this split and write selected.csv: only val (the "
                  "validation images of --shots); test is refused.")
    add_flag(g, "--select-per", type=name_list, default=None, metavar="FLAGS",
             help="Grid flags that define the protocol rather than a hyper-parameter: one setting is chosen per "
                  "value of them and per dataset (default: those of shots, base-new, train-dataset, sequence, "
                  "eval-datasets in the grid, and the variant).")
    add_flag(g, "--dry-run", action="store_true",
             help="Check every point and print its command and whether it finished, then exit without running.")
    return parser


def plan(options: argparse.Namespace) -> tuple[list[PointCommand], list[str], dict[str, tuple[str, ...]] | None]:
    """Every point's checked command, the grid's columns and the variants' flags. One-line UserErrors; nothing is
    written."""
    axes = ([variant_axis(options.variant)] if options.variant else []) + \
        (axes_from_file(options.grid_file) if options.grid_file else []) + (options.grid or [])
    check_axes(axes, options.seeds)
    if not axes and not options.seeds:
        raise UserError("nothing to sweep: give --grid FLAG=V1,V2 (or --grid-file, --variant) and/or --seeds")
    base = parse_base(options.base)
    variants = next((dict(zip(a.values, a.bundles)) for a in axes if a.key == VARIANT_AXIS and a.bundles), None)
    planner = Planner(base, [a.key for a in axes], options.seeds is not None, variants,
                      sample_seed=options.seeds[0] if options.seeds else None)
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    points = expand(axes, options.seeds)
    commands = [planner.command(point, out / point.name) for point in points]
    for note in planner.notes:
        print(note, file=sys.stderr)
    keys = list(points[0].columns)
    if options.select_per is not None:
        unknown = [k for k in map(normal_key, options.select_per) if k not in keys]
        if unknown:
            raise UserError(f"--select-per {', '.join(unknown)}: not an axis of the grid ({', '.join(keys)})")
    if options.select_on and base.mtil:
        without = [c.point.name for c in commands if c.args.shots is None]
        if without:
            raise UserError(f"--select-on val needs validation accuracies, which runs with --shots K measure; "
                            f"{without[0]} has no --shots (give it in --base or the grid)")
    return commands, keys, variants


def _results_text(folder: Path) -> str:
    parts = []
    for r in tables.read_results(folder) or []:
        shown = "  ".join(f"{'HM' if m == 'hm' else m} {r[m]:.2f}" for m in tables.MEASURES if m in r)
        parts.append(f"{r['dataset']} {shown}")
    return "; ".join(parts)


def report_outcome(outcome: Outcome, index: int, total: int) -> None:
    print(outcome_line(outcome, index, total, _results_text(outcome.command.save)), flush=True)


def exit_code(outcomes: list[Outcome]) -> int:
    """0 when every point finished; 3 when a stop request left points to resume; else 1 (a point failed)."""
    if any(o.status == "failed" for o in outcomes):
        return 1
    if any(o.status in ("interrupted", "not started") for o in outcomes):
        return 3
    return 0


def finish(outcomes: list[Outcome], program: str, unit: str) -> int:
    """The exit code of :func:`exit_code`, with its line (``program`` names the tool, ``unit`` a run: point, seed)."""
    code = exit_code(outcomes)
    if code == 3:
        print(f"{program}: stopped; run the same command again to resume")
    elif code == 1:
        print(f"{program}: {sum(o.status == 'failed' for o in outcomes)} {unit}(s) failed (see above)")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        commands, keys, variants = plan(options)
        out = Path(options.out)
        done = sum(is_finished(c) for c in commands)
        print(f"mtil.sweep: {len(commands)} points ({done} finished before) under {out}")
        if options.dry_run:
            for command in commands:
                print(f"{'[finished] ' if is_finished(command) else ''}{command.text}")
            return 0
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / "sweep.yaml", "w") as handle:
            yaml.safe_dump({"base": options.base, "grid": {k: list(v) for k, v in _grid(commands, keys).items()},
                            "variants": {n: shlex.join(f) for n, f in (variants or {}).items()} or None,
                            "seeds": options.seeds}, handle, sort_keys=False)
        outcomes = Runner(commands, options.parallel, report_outcome).run()
        rows = tables.collect([(c.point.columns, c.point.name, c.save, o.status)
                               for c, o in zip(commands, outcomes)])
        summary, files = tables.write_tables(out, rows, keys, seed_columns([c.point for c in commands]))
        print(f"\nMean ± std over seeds ({files[1]}):\n{tables.markdown(summary, _grouped(keys))}")
        if options.select_on:
            per = [normal_key(k) for k in options.select_per] if options.select_per is not None else \
                [k for k in keys if k in PROTOCOL_KEYS]
            chosen = tables.select(summary, per, options.select_on)
            by = _grouped(keys)
            tables.write_csv(out / "selected.csv", chosen, tables.summary_columns(by, chosen))
            print(f"\nChosen on {options.select_on} (per {', '.join(per + ['dataset'])}; test shown, not used to "
                  f"choose; {out / 'selected.csv'}):\n{tables.markdown(chosen, by)}")
        return finish(outcomes, "mtil.sweep", "point")
    except UserError as exc:
        print("mtil.sweep: error: " + str(exc).replace("\n", "\\n"), file=sys.stderr)
        return 2
    except OSError as exc:  # a path the file system refuses (too long, read-only, a file for a folder): one line
        error = path_error(exc)
        if error is None:
            raise
        print(f"mtil.sweep: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtil.sweep: interrupted", file=sys.stderr)
        return 130


def _grouped(keys: list[str]) -> list[str]:
    return [k for k in keys if k not in SEED_KEYS]


def _grid(commands: list[PointCommand], keys: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for command in commands:
        for key, value in command.point.values.items():
            grid.setdefault(key, [])
            if value not in grid[key]:
                grid[key].append(value)
    return grid
