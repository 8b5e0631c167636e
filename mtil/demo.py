"""The main job of ``make demo``: continual learning on the built-in benchmark, over three seeds, on a CPU.

1. Every method learns the ToyWorld task sequence from ``toyclip``, the benchmark's pre-trained tiny CLIP shipped
   with mtil (``scripts/pretrain_toyclip.py`` re-creates it), once per seed. Each run is a plain
   ``python -m mtil.main`` command (printed, so it can be repeated by hand) writing its accuracy matrix, heat
   map, checkpoints and log under ``<out>/<method>/seed<k>/``; an interrupted demo resumes where it stopped.
2. Two controls bound the table: the zero-shot model itself (no training: the Transfer ceiling) and joint
   training on all tasks at once (the Last ceiling).
3. One table of mean ± std over the seeds (Transfer / Avg / Last and each task's accuracy right after it was
   trained), ``<out>/summary.csv``, ``<out>/comparison.png`` (Transfer against Last) and each method's mean
   accuracy matrix as a heat map.

The runs are independent, so they run side by side, one single-threaded process per core: for a model this small
that uses two cores better than one process with two threads.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from tqdm import tqdm

from mtil.flags import DefaultsHelpFormatter
from mtil.benchmark_checks import check_rows
from mtil.engine.tasks import NAMED_ORDERS, read_sequence_file
from mtil.evaluation import matrix as mx

# The sequence's settings, chosen by measurement on this benchmark (docs/toyworld.md).
SEQUENCE = ["--model", "toyclip", "--workers", "0", "--device", "cpu"]
TRAINING = ["--batch-size", "32", "--lr", "7e-4", "--warmup-length", "10", "--wd", "0.1", "--log-every", "50"]
# The token embedding (49 408 rows, 84 of them the benchmark's words) stays frozen: updating it is a third of a
# step's time on the CPU and changes nothing the benchmark reads.
FROZEN = [*TRAINING, "--freeze", "token_embedding.*"]
# ZSCL's reference data on the built-in benchmark: the caption corpus's images and captions.
_REFERENCE = ["--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions", "--ref-sentences-count", "1000",
              "--ref-batch-size", "32"]
# name -> flags; the controls come first.
METHODS: dict[str, list[str]] = {
    "zeroshot": ["--method", "zeroshot"],
    "joint": ["--method", "joint", *FROZEN],
    "finetune": ["--method", "finetune", *FROZEN],
    "lwf": ["--method", "lwf", "--ref-batch-size", "32", *FROZEN],
    "wise-ft": ["--method", "finetune", "--wise-merge", "--wise-ft-alpha", "0.5", "--wise-ref", "zeroshot",
                *FROZEN],
    "ZSCL": ["--method", "ZSCL", *_REFERENCE, *FROZEN],
    "lora": ["--method", "finetune", "--lora", "--lora-r", "8", "--lora-alpha", "16", *TRAINING],
    "icarl": ["--method", "icarl", "--memory-size", "100", "--ref-batch-size", "32", *FROZEN],
    "ogd": ["--method", "finetune", "--orthogonal-gradients", "5", *FROZEN],
    # frozen-CLIP methods with their own learning rates (a given --lr or --freeze is refused or overrides them)
    "moe-adapters": ["--method", "moe-adapters", "--batch-size", "32", "--warmup-length", "10", "--log-every", "50"],
    "diki": ["--method", "diki", "--batch-size", "32", "--warmup-length", "0", "--log-every", "50"],
}
# What ``make demo-full`` runs within about 12 minutes on 2 CPU cores; ``--methods all`` runs every one.
DEFAULT_METHODS = ("zeroshot", "joint", "finetune", "ZSCL")
# ``--quick`` (``make demo``, a newcomer's first command): the effect itself, fine-tuning forgetting what the
# zero-shot model knew and ZSCL keeping it, one seed, in a few minutes; the table's checks need several seeds.
QUICK_METHODS = ("zeroshot", "finetune", "ZSCL")
QUICK_SEEDS = (0,)
DETERMINISTIC = ("zeroshot",)  # trains nothing: one run stands for every seed
# Relative cost of a training step per method, and of one evaluation row in steps (measured; for the ETA only).
COST = {"ZSCL": 2.0, "lwf": 1.5, "icarl": 1.5, "ogd": 1.3}
EVALUATION_COST = 60
DEFAULT_SEEDS = (0, 1, 2)


@dataclass
class Job:
    method: str
    seed: int
    argv: list[str]
    save: Path
    steps: list[int]  # per task, for the progress bar
    code: int | None = None
    summary: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.save / "run.log"

    @property
    def label(self) -> str:
        return self.method if self.method in DETERMINISTIC else f"{self.method} seed {self.seed}"


def command_line(argv: list[str]) -> str:
    return "python -m mtil.main " + " ".join(shlex.quote(a) for a in argv)


def order_of(order: str) -> list[str]:
    """The task names of a named order or a comma list."""
    if order in NAMED_ORDERS:
        return [spec.dataset for spec in read_sequence_file(NAMED_ORDERS[order], builtin=True)]
    return [name.strip() for name in order.split(",") if name.strip()]


def _toyworld_settings() -> dict[str, dict]:
    """Each ToyWorld task's own settings in the named order (its number of steps)."""
    return {spec.dataset: spec.overrides for spec in read_sequence_file(NAMED_ORDERS["ToyWorld"], builtin=True)}


def sequence_file(out: Path, tasks: list[str]) -> Path:
    """``<out>/sequence.yaml``: ``tasks`` in this order, each with the per-task settings the ToyWorld order gives
    it (its number of steps), so that another order trains every task as long as the demo does."""
    settings = _toyworld_settings()
    entries = [{"dataset": name, **settings.get(name, {})} for name in tasks]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sequence.yaml"
    path.write_text("# written by mtil.demo: the tasks in this order, with the ToyWorld order's per-task settings\n"
                    + yaml.safe_dump({"tasks": entries}, sort_keys=False))
    return path


def plan(out: Path, methods: list[str], seeds: list[int], order: str, extra: list[str] = ()) -> list[Job]:
    """One job per method and seed (one for a deterministic control)."""
    tasks = order_of(order)
    task_steps = {name: int(values.get("iterations", 100)) for name, values in _toyworld_settings().items()}
    sequence = ["--train-dataset", order] if order in NAMED_ORDERS else ["--sequence", str(sequence_file(out, tasks))]
    jobs = []
    for method in methods:
        for seed in seeds[:1] if method in DETERMINISTIC else seeds:
            save = out / method / (f"seed{seed}" if method not in DETERMINISTIC else "")
            argv = [*SEQUENCE, *METHODS[method], *sequence, "--seed", str(seed), *extra, "--save", str(save)]
            steps = [0] * len(tasks) if method == "zeroshot" else [task_steps.get(t, 100) for t in tasks]
            jobs.append(Job(method, seed, argv, save, steps))
    return jobs


def _run_job(job: Job) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    job.save.mkdir(parents=True, exist_ok=True)
    with job.log.open("w") as handle:
        return subprocess.call([sys.executable, "-m", "mtil.main", *job.argv, "--threads", "1"], env=env,
                               stdout=handle, stderr=subprocess.STDOUT)


_STEP_LINE = re.compile(r"^\[\S+\] step (\d+)/\d+")


def _progress(job: Job) -> tuple[int, int]:
    """(tasks finished, steps done in the task in progress), read from the run's log."""
    try:
        lines = job.log.read_text(errors="replace").splitlines()
    except OSError:
        return 0, 0
    tasks, steps = 0, 0
    for line in lines:
        if line.startswith("[after task"):
            tasks, steps = tasks + 1, 0
        elif match := _STEP_LINE.match(line):
            steps = int(match.group(1))
    return tasks, steps


def _finished_line(job: Job) -> str:
    s = job.summary
    diagonal = " ".join(f"{v:.0f}" for v in s.get("diagonal", []))
    return (f"{job.label:<18} Transfer {s['transfer']:6.2f}  Avg {s['avg']:6.2f}  Last {s['last']:6.2f}  "
            f"(each task after training it: {diagonal})")


def read_run(job: Job, order: list[str]) -> dict:
    """Transfer / Avg / Last and the diagonal of a finished run, from its accuracy matrix."""
    long = mx.read_matrix(job.save / "accuracy_matrix.csv")
    metrics = mx.summarize(long, order)
    wide = mx.to_wide(long, order)
    # each task's accuracy right after it was trained; joint training trains every task at the last one
    rows = [len(order)] * len(order) if job.method == "joint" else range(1, len(order) + 1)
    diagonal = [float(wide.at[i, name]) for i, name in zip(rows, order)]
    return {**metrics, "diagonal": diagonal, "matrix": wide}


def _work(job: Job, tasks_done: int, steps: int = 0) -> float:
    """Estimated cost of a job's first ``tasks_done`` tasks and ``steps`` of the next: its steps (times the
    method's relative cost) plus an evaluation's worth per task."""
    return COST.get(job.method, 1.0) * (sum(job.steps[:tasks_done]) + steps) + EVALUATION_COST * tasks_done


def run_jobs(jobs: list[Job], order: list[str], parallel: int) -> bool:
    """Run the jobs side by side, with an overall bar (work done, ETA) and a line per finished run."""
    total = sum(_work(j, len(j.steps)) for j in jobs)
    bar = tqdm(total=100.0, desc="demo", dynamic_ncols=True, file=sys.stdout,
               bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]")
    done = threading.Event()
    lock = threading.Lock()

    def credit() -> None:
        with lock:
            work = sum(_work(j, len(j.steps)) if j.code is not None else _work(j, *_progress(j)) for j in jobs)
            bar.n = round(100.0 * min(work, total) / total, 1)
            bar.refresh()

    def monitor() -> None:
        while not done.wait(2.0):
            credit()

    def one(job: Job) -> Job:
        job.code = _run_job(job)
        if job.code == 0:
            job.summary = read_run(job, order)
        with lock:
            bar.write(_finished_line(job) if job.code == 0 else
                      f"{job.label}: FAILED (exit {job.code}); see {job.log}")
        credit()
        return job

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    longest_first = sorted(jobs, key=lambda j: -_work(j, len(j.steps)))  # the side-by-side runs end together
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(one, longest_first))
    done.set()
    bar.close()
    return all(j.code == 0 for j in jobs)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(jobs: list[Job], order: list[str]) -> list[dict]:
    """Per method: mean and std over seeds of Transfer / Avg / Last and of each diagonal entry."""
    rows = []
    for method in dict.fromkeys(j.method for j in jobs):
        runs = [j.summary for j in jobs if j.method == method and j.summary]
        if not runs:
            continue
        row = {"method": method, "seeds": len(runs)}
        for key in ("transfer", "avg", "last"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in runs])
        for i, name in enumerate(order):
            row[f"diag_{name}"], row[f"diag_{name}_std"] = _mean_std([r["diagonal"][i] for r in runs])
        matrices = [r["matrix"] for r in runs]
        row["matrix"] = sum(matrices[1:], matrices[0]) / len(matrices)
        rows.append(row)
    return rows


def format_table(rows: list[dict], order: list[str]) -> str:
    short = [name.removeprefix("Toy")[:8] for name in order]
    header = f"{'method':<10} {'Transfer':>13} {'Avg':>13} {'Last':>13}   " + " ".join(f"{s:>8}" for s in short)
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = [f"{r[k]:6.2f} ± {r[k + '_std']:4.2f}" if r["seeds"] > 1 else f"{r[k]:6.2f}"  # one seed: no spread
                 for k in ("transfer", "avg", "last")]
        if r["method"] == "joint":  # trains only at the end: its "Transfer" is the zero-shot model's
            cells[0] = f"{'(zero-shot)':>13}"
        diagonal = " ".join(f"{r[f'diag_{n}']:8.1f}" for n in order)
        lines.append(f"{r['method']:<10} " + " ".join(f"{c:>13}" for c in cells) + "   " + diagonal)
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], order: list[str]) -> None:
    """summary.csv (mean and std per method), comparison.png and each method's mean matrix heat map."""
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "matrix"} for r in rows])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    for r in rows:
        wide = r["matrix"]
        long = [{"after_task": int(i), "dataset": name, "top1": float(wide.at[i, name]), "top5": float("nan")}
                for i in wide.index for name in order]
        mx.plot_heatmap(mx.upsert_rows(mx.empty_matrix(), long), order, out / r["method"] / "accuracy_matrix_mean.png",
                        title=f"{r['method']} (mean over {r['seeds']} seed{'s' if r['seeds'] > 1 else ''})")
    plot_comparison(rows, out / "comparison.png")


def plot_comparison(rows: list[dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        if r["method"] == "joint":  # its Transfer is the zero-shot model's: show its Last as a line
            ax.axhline(r["last"], color="grey", linestyle="--", linewidth=1)
            ax.text(ax.get_xlim()[0], r["last"], " joint training (Last ceiling)", va="bottom", fontsize=8)
            continue
        ax.errorbar(r["transfer"], r["last"], xerr=r["transfer_std"], yerr=r["last_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["transfer"], r["last"]), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("Transfer (%): zero-shot ability kept on tasks not yet trained")
    ax.set_ylabel("Last (%): accuracy on all tasks at the end")
    ax.set_title("ToyWorld: mean ± std over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with path.open("wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    return path


def experiment(out: Path, methods: list[str], seeds: list[int], order: str, parallel: int,
               extra: list[str] = ()) -> tuple[list[dict], list[str]] | None:
    """Plan, run and aggregate; prints as it goes. None when a run failed."""
    tasks = order_of(order)
    jobs = plan(out, methods, seeds, order, list(extra))
    print(f"{len(jobs)} runs ({', '.join(methods)}; seeds {', '.join(map(str, seeds))}) on "
          f"{' -> '.join(tasks)}, {parallel} at a time. Each is one command, e.g.\n$ {command_line(jobs[-1].argv)}",
          flush=True)
    started = time.perf_counter()
    if not run_jobs(jobs, tasks, parallel):
        return None
    rows = aggregate(jobs, tasks)
    over = "Mean ± std over seeds" if len(seeds) > 1 else f"Seed {seeds[0]}"
    print(f"\nAll runs finished in {time.perf_counter() - started:.0f} s. {over} (top-1 %); the last columns are each "
          f"task's accuracy right after it was trained:\n")
    print(format_table(rows, tasks))
    return rows, tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtil.demo", description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--out", default="ckpt/demo", help="where the runs, summary.csv and comparison.png go")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated, or 'all'; from: " + ", ".join(METHODS))
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
    parser.add_argument("--order", default="ToyWorld", help="the task sequence: ToyWorld or a comma list of tasks")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1,
                        help="runs side by side (each single-threaded)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a first look in a few minutes: --methods {','.join(QUICK_METHODS)} --seeds "
                             f"{','.join(map(str, QUICK_SEEDS))} (what make demo runs; make demo-full: the "
                             f"three-seed table and its checks)")
    args = parser.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        if given & {"--methods", "--seeds"}:
            print("mtil.demo: --quick sets --methods and --seeds: give one or the other", file=sys.stderr)
            return 2
        args.methods, args.seeds = ",".join(QUICK_METHODS), ",".join(map(str, QUICK_SEEDS))
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        print(f"mtil.demo: --methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"mtil.demo: --seeds: expected comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    result = experiment(out, names, seeds, args.order, args.parallel)
    if result is None:
        print("mtil.demo: a run failed (its log is named above); re-running resumes the others", file=sys.stderr)
        return 1
    rows, tasks = result
    write_outputs(out, rows, tasks)
    checks = check_rows(rows, tasks) if len(seeds) > 1 else []
    if len(seeds) == 1:  # the checks compare gaps with the spread over seeds: one seed has none
        print("\nOne seed: the table shows the effect, not its noise. The three-seed table and its checks "
              "(mtil/benchmark_checks.py): make demo-full (python -m mtil.demo).")
    if checks:
        print("\nWhat the table shows (mtil/benchmark_checks.py):\n" + "\n".join(c.line() for c in checks))
    print(f"\nWritten: {out / 'summary.csv'}, {out / 'comparison.png'}; per-run matrices, heat maps and logs in "
          f"{out}/<method>/seed<k>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
