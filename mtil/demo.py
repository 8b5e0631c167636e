"""The main job of ``make demo``: continual learning on the built-in benchmark, start to finish, on a CPU.

1. A tiny CLIP (``tiny-vit``) gains zero-shot ability by contrastive training on the built-in image-caption
   corpus (``ToyCaptions``). The result is cached in ``ckpt/toyclip/`` (re-running reuses it).
2. Each method learns the ToyWorld task sequence from that model; each run writes its accuracy matrix under
   ``ckpt/demo/<method>/`` (and resumes if interrupted).
3. One table, ``ckpt/demo/summary.csv``, compares the methods by Transfer / Avg / Last.

Every step is a plain ``python -m mtil.main`` command, printed before it runs, so it can be repeated by hand.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mtil.evaluation import matrix as mx
from mtil.main import main as mtil_main

PRETRAIN = [
    "--model", "tiny-vit", "--method", "contrastive", "--train-dataset", "ToyCaptions",
    "--iterations", "800", "--batch-size", "64", "--lr", "1e-3", "--wd", "0.1", "--warmup-length", "30",
    "--eval-datasets", "ToyShape,ToyPattern,ToyColor,ToyCount,ToyPosition",
]
SEQUENCE = [
    "--train-dataset", "ToyWorld", "--iterations", "50", "--batch-size", "64", "--lr", "1e-4",
    "--warmup-length", "10", "--ls", "0.2",
]
# name -> extra flags. ZSCL's reference data on the built-in benchmark: the caption corpus's images and captions.
METHODS: dict[str, list[str]] = {
    "finetune": ["--method", "finetune"],
    "lwf": ["--method", "lwf"],
    "icarl": ["--method", "icarl", "--memory-size", "200"],
    "wise-ft": ["--method", "finetune", "--wise-merge", "--wise-ft-alpha", "0.8", "--wise-ref", "zeroshot"],
    "ZSCL": ["--method", "ZSCL", "--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions",
             "--ref-sentences-count", "2000"],
}


def _call(argv: list[str]) -> None:
    print("$ python -m mtil.main " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = mtil_main(argv)
    if code != 0:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtil.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ckpt/demo", help="where the method runs and summary.csv go")
    parser.add_argument("--pretrained", default="ckpt/toyclip", help="where the pre-trained tiny CLIP is cached")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--max-evaluation-size", default="300", help="test images per dataset and evaluation")
    parser.add_argument("--workers", default="0", help="loader workers (0 is fastest on a 2-core CPU)")
    args = parser.parse_args(argv)

    common = ["--max-evaluation-size", args.max_evaluation_size, "--workers", args.workers]
    print("== 1. a tiny CLIP learns zero-shot ability from the built-in captions ==")
    _call(PRETRAIN + common + ["--save", args.pretrained])
    start = str(Path(args.pretrained) / "ToyCaptions.pth")

    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if name not in METHODS:
            print(f"mtil.demo: unknown method {name!r}; choose from {', '.join(METHODS)}", file=sys.stderr)
            return 2
        print(f"\n== 2. continual learning of the ToyWorld sequence: {name} ==")
        save = Path(args.out) / name
        _call(["--model", "tiny-vit", "--load", start, *METHODS[name], *SEQUENCE, *common, "--save", str(save)])
        row = mx.read_summary(save / "summary.csv")[0]
        rows.append({**row, "method": name})

    summary = Path(args.out) / "summary.csv"
    mx.write_summary(summary, rows)
    print("\n== 3. comparison (top-1 %, ToyWorld sequence) ==")
    print(mx.format_summary(rows))
    print(f"\nWritten: {summary}; matrices and heat maps in {args.out}/<method>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
