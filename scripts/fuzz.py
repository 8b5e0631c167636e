"""A long fuzz run of mtil's input layers: the targets of tests/fuzz_strategies.py with thousands of cases each.

    python scripts/fuzz.py                          # 2000 cases per target, seed 0
    python scripts/fuzz.py --examples 500 --seed 3 --targets cli,config
    python scripts/fuzz.py --list

Prints per target the cases run, how many ended in a clean error (exit code 2 and one ``mtil: error:`` line, the
project's UserError, or a damaged metric file rebuilt with a warning), how many passed as valid, and each distinct
crash (an uncaught exception or an unclean exit) with a reproducer; the files of a crashing case are saved under
``--crash-dir``. Exit code 1 if any target crashed. Nothing is trained, downloaded or written outside temporary
folders (and ``--crash-dir`` when there is a crash).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.fuzz_strategies import ERROR, TARGETS, TARGETS_BY_NAME, VALID, Case, describe, run_case  # noqa: E402


def signature(exc: BaseException) -> str:
    """Exception type and the innermost mtil frame: one line per distinct crash."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if "/mtil/" in f.filename.replace("\\", "/")] or frames
    if not inside:
        return type(exc).__name__
    path = Path(inside[-1].filename)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"{type(exc).__name__} at {shown}:{inside[-1].lineno}"


def save_case(case: Case, folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    case.write(folder)
    (folder / "CASE.txt").write_text(text + "\n")
    return folder


def fuzz_target(target, examples: int, seed_value: int, crash_dir: Path, show: int) -> dict:
    counts: Counter = Counter()
    crashes: dict[str, tuple[Case, BaseException]] = {}

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(target.cases())
    def one(case: Case) -> None:
        try:
            outcome = run_case(case)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a parser counts as a crash too
            counts["crash"] += 1
            crashes.setdefault(signature(exc), (case, exc))
            return
        counts[outcome] += 1

    started = time.monotonic()
    one()
    seconds = time.monotonic() - started
    run = sum(counts.values())
    print(f"{target.name:<10} {run:>6} cases  {counts[ERROR]:>6} clean errors  {counts[VALID]:>6} valid  "
          f"{counts['crash']:>5} crashes  ({seconds:.0f} s)  {target.what}", flush=True)
    for number, (sig, (case, exc)) in enumerate(sorted(crashes.items()), 1):
        text = (f"{target.name} crash {number}: {sig}: {type(exc).__name__}: {str(exc)[:300]}\n"
                f"    {describe(case)}")
        folder = save_case(case, crash_dir / f"{target.name}-{number}", text + "\n\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if number <= show:
            print("  " + text.replace("\n", "\n  "))
            print(f"    files and traceback: {folder}")
    if len(crashes) > show:
        print(f"  ... {len(crashes) - show} more distinct crashes under {crash_dir}")
    return {"cases": run, "errors": counts[ERROR], "valid": counts[VALID], "crashes": counts["crash"],
            "distinct": len(crashes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="Cases per target.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the case generation (reproducible runs).")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS),
                        help="Comma-separated targets (see --list).")
    parser.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"),
                        help="Where the files of crashing cases go (one folder per distinct crash).")
    parser.add_argument("--show", type=int, default=5, help="Distinct crashes printed per target.")
    parser.add_argument("--list", action="store_true", help="List the targets and exit.")
    args = parser.parse_args(argv)
    if args.list:
        for target in TARGETS:
            print(f"{target.name:<10} {target.what}")
        return 0
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS_BY_NAME]
    if unknown:
        parser.error(f"unknown targets {unknown}; targets: {', '.join(TARGETS_BY_NAME)}")
    if args.examples < 1:
        parser.error("--examples must be 1 or more")

    import torch

    torch.set_num_threads(1)  # tiny models; a busy machine stays usable
    print(f"mtil fuzz: {args.examples} cases per target, seed {args.seed}", flush=True)
    results = {n: fuzz_target(TARGETS_BY_NAME[n], args.examples, args.seed, args.crash_dir, args.show)
               for n in names}
    total = {k: sum(r[k] for r in results.values()) for k in ("cases", "errors", "valid", "crashes")}
    print(f"{'total':<10} {total['cases']:>6} cases  {total['errors']:>6} clean errors  {total['valid']:>6} valid  "
          f"{total['crashes']:>5} crashes")
    return 1 if total["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
