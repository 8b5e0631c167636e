"""The main job of ``make demo``: continual learning on the built-in benchmark, start to finish, on a CPU.

1. A tiny CLIP (``tiny-vit``) gains zero-shot ability by contrastive training on the built-in image-caption
   corpus (``ToyCaptions``). The result is cached in ``ckpt/toyclip/`` (re-running reuses it).
2. Each method learns the ToyWorld task sequence from that model; each run writes its accuracy matrix, heat map,
   checkpoints and log under ``ckpt/demo/<method>/`` (and resumes if interrupted).
3. One table, ``ckpt/demo/summary.csv``, compares the methods by Transfer / Avg / Last.

Every step is a plain ``python -m mtil.main`` command, printed so it can be repeated by hand. The method runs
are independent, so they run side by side, one single-threaded process per core: for a model this small that
uses two cores better than one process with two threads.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mtil.evaluation import matrix as mx

PRETRAIN = [
    "--model", "tiny-vit", "--method", "contrastive", "--train-dataset", "ToyCaptions",
    "--iterations", "600", "--batch-size", "64", "--lr", "1e-3", "--wd", "0.1", "--warmup-length", "30",
    "--eval-datasets", "ToyPosition,ToyPattern,ToyColor,ToyShape,ToyCount",
]
SEQUENCE = [
    "--train-dataset", "ToyWorld", "--iterations", "80", "--batch-size", "64", "--lr", "1e-3",
    "--warmup-length", "10",
]
# name -> flags. ZSCL's reference data on the built-in benchmark: the caption corpus's images and captions.
METHODS: dict[str, list[str]] = {
    "finetune": ["--method", "finetune"],
    "lwf": ["--method", "lwf", "--ref-batch-size", "32"],
    "icarl": ["--method", "icarl", "--memory-size", "200", "--ref-batch-size", "32"],
    "wise-ft": ["--method", "finetune", "--wise-merge", "--wise-ft-alpha", "0.8", "--wise-ref", "zeroshot"],
    "ZSCL": ["--method", "ZSCL", "--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions",
             "--ref-sentences-count", "2000", "--ref-batch-size", "32"],
    "lora": ["--method", "finetune", "--lora", "--lora-r", "8", "--lora-alpha", "16"],
    "ogd": ["--method", "finetune", "--orthogonal-gradients", "5"],
}


def _command(argv: list[str]) -> str:
    return "python -m mtil.main " + " ".join(shlex.quote(a) for a in argv)


def _run(argv: list[str], log: Path | None = None, threads: int | None = None) -> int:
    """Run one mtil command in a child process; its output goes to the terminal or to ``log``."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if log is None:
        return subprocess.call([sys.executable, "-m", "mtil.main", *argv], env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        return subprocess.call([sys.executable, "-m", "mtil.main", *argv], env=env, stdout=handle,
                               stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtil.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ckpt/demo", help="where the method runs and summary.csv go")
    parser.add_argument("--pretrained", default="ckpt/toyclip", help="where the pre-trained tiny CLIP is cached")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--max-evaluation-size", default="200", help="test images per dataset and evaluation")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1,
                        help="method runs side by side (each single-threaded)")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        print(f"mtil.demo: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2

    common = ["--max-evaluation-size", args.max_evaluation_size, "--workers", "0"]
    print("== 1. a tiny CLIP learns zero-shot ability from the built-in captions ==")
    pretrain = PRETRAIN + common + ["--save", args.pretrained]
    print("$ " + _command(pretrain), flush=True)
    if _run(pretrain) != 0:
        return 1
    start = str(Path(args.pretrained) / "ToyCaptions.pth")

    print(f"\n== 2. continual learning of the ToyWorld sequence, {len(names)} methods, {args.parallel} at a time ==")
    runs = {}
    for name in names:
        save = Path(args.out) / name
        runs[name] = (["--model", "tiny-vit", "--load", start, *METHODS[name], *SEQUENCE, *common,
                       "--save", str(save)], save / "run.log")
        print(f"$ {_command(runs[name][0])}  > {runs[name][1]}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        codes = dict(zip(names, pool.map(lambda n: _run(runs[n][0], runs[n][1], threads=1), names)))

    rows = []
    for name in names:
        log_lines = runs[name][1].read_text().splitlines()
        last_row = max((i for i, line in enumerate(log_lines) if line.startswith("[after task")), default=-1)
        print(f"\n-- {name} --\n" + "\n".join(log_lines[last_row + 1:]))
        if codes[name] != 0:
            print(f"mtil.demo: {name} failed (exit {codes[name]}); see {runs[name][1]}", file=sys.stderr)
            return 1
        rows.append({**mx.read_summary(Path(args.out) / name / "summary.csv")[0], "method": name})

    summary = Path(args.out) / "summary.csv"
    mx.write_summary(summary, rows)
    print("\n== 3. comparison (top-1 %, ToyWorld sequence) ==")
    print(mx.format_summary(rows))
    print(f"\nWritten: {summary}; matrices, heat maps and logs in {args.out}/<method>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
