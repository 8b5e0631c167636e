"""``python -m mtil.launch``: torchrun with mtil's errors. The same arguments as ``torchrun`` (it is torch's own
launcher, ``torch.distributed.run``, called in this process), for example::

    python -m mtil.launch --standalone --nproc_per_node=4 -m mtil.main --model ViT-B/16 --train-dataset MTIL-I ...

Under ``torchrun`` a bad flag or missing data ends in the worker's one line followed by torch's own
ChildFailedError report (about 30 lines, a traceback among them) and exit code 1. Here the command line of
``-m mtil.main`` (or ``-m mtil.imo``) is checked before any process starts (one line, exit code 2, nothing
started); a worker that stops on mtil's error (exit code 2) is the one line it printed and exit code 2; a worker
that fails otherwise is one line naming its rank and exit code, and that code (its own output above it says why).
torch's launcher log lines are left out below errors (``--verbose``: all of them).
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

CHECKED = ("mtil.main", "mtil.imo")  # entry points whose command line is checked before the workers start


def _check_entry(module: str, argv: list[str]) -> int | None:
    """Run ``module``'s checks on ``argv`` in this process: the exit code of a refusal, else None."""
    if module == "mtil.main":
        from mtil.main import check_command_line

        return check_command_line(argv)
    if module == "mtil.imo":
        from mtil.imo import check_command_line as check_imo

        return check_imo(argv)
    return None


def _checked_as_a_worker(args, check) -> int | None:
    """Run ``check`` with WORLD_SIZE as the workers will see it (a command may depend on running on several
    processes, e.g. the IMO seed's --distributed), and RANK 0 (the one that speaks)."""
    import os

    try:
        per_node = int(args.nproc_per_node)
    except (TypeError, ValueError):  # "gpu", "auto": at least two when there is a choice
        per_node = 2
    nodes = int(str(args.nnodes).split(":")[-1]) if str(args.nnodes).split(":")[-1].isdigit() else 1
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE=str(max(1, per_node * nodes)), RANK="0")
    try:
        return check()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        args = parse_args(argv)
    except SystemExit as exc:  # torchrun's own parser: its usage line and message are already printed
        return int(exc.code or 0)
    if args.module and args.training_script in CHECKED:
        code = _checked_as_a_worker(args, lambda: _check_entry(args.training_script, list(args.training_script_args)))
        if code is not None:
            return code
    if not verbose:  # the launcher's own chatter (each of its loggers sets its level itself)
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode != 2:  # not mtil's one-line refusal (the worker printed that itself)
            print(f"mtil.launch: rank {rank} stopped with exit code {failure.exitcode} (its output is above)",
                  file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
