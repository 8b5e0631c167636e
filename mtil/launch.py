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
    except (TypeError, ValueError):  # "gpu", "auto", "cpu": as torchrun counts them
        import torch

        gpus = torch.cuda.device_count()
        per_node = gpus if args.nproc_per_node == "gpu" or (args.nproc_per_node == "auto" and gpus) else \
            (os.cpu_count() or 1)
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


EXPECTED_EXITS = {2: None, 3: "preempted: its checkpoint is saved, run the same command again",
                  130: "interrupted (Ctrl-C)"}  # mtil's refusal (the worker said why), a stop request, Ctrl-C


def _split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``--verbose`` is the launcher's own only before the training script (``-m MODULE`` or a script path)."""
    for index, token in enumerate(argv):
        if token in ("-m", "--module") or token.endswith(".py"):
            head, tail = argv[:index], argv[index:]
            return [a for a in head if a != "--verbose"] + tail, "--verbose" in head
    return [a for a in argv if a != "--verbose"], "--verbose" in argv


def main(argv: Sequence[str] | None = None) -> int:
    argv, verbose = _split_verbose(list(sys.argv[1:] if argv is None else argv))
    from torch.distributed.elastic.multiprocessing.api import SignalException
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
    except SignalException as exc:  # the launcher itself was signalled (Ctrl-C, SIGTERM): the workers got it too
        print(f"mtil.launch: stopped by {exc.sigval.name}; the workers saved what they could (run the same command "
              f"again to resume)", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        if code in EXPECTED_EXITS and EXPECTED_EXITS[code]:
            print(f"mtil.launch: {EXPECTED_EXITS[code]}", file=sys.stderr)
        elif code == 2:  # mtil's refusal: rank 0 printed its line, or this says the line another rank left
            said = {r: str(f.message) for r, f in exc.failures.items() if str(f.message).startswith("mtil: error:")}
            if 0 not in said:
                other = min(said) if said else rank
                print(f"{said[other]} (rank {other})" if said else
                      f"mtil.launch: rank {rank} stopped with exit code 2", file=sys.stderr)
        elif code not in EXPECTED_EXITS:
            print(f"mtil.launch: rank {rank} stopped with exit code {code} (its output is above)", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
