"""Entry point: flags -> resolved configuration -> the job (train a sequence, evaluate, classify one image, summarize,
or run the command once per seed of --seeds)."""
from __future__ import annotations

if __name__ == "__main__":  # before the slow imports: a SIGTERM/SIGUSR1 at start-up is a stop request, not death
    from mtil.engine.preemption import install_early_handlers, stop_with_parent

    install_early_handlers()
    stop_with_parent()  # a point of mtil.sweep stops (saving) when the sweep is killed

import argparse
import sys
from typing import Sequence

from mtil.cli_spec import quick_answer
from mtil.errors import UserError, no_space_cause, no_space_error, path_error
from mtil.seed_flags import translate_main


def _error(message: str) -> None:
    """The one error line (a line break in a file name or value stays on it); under torchrun or srun only rank 0
    says it, as the other ranks meet the same error. Under torchrun every rank also leaves it in its error file
    (``TORCHELASTIC_ERROR_FILE``), where ``python -m mtil.launch`` (and torchrun's own report) find it: an error
    only another rank met is said by the launcher."""
    line = "mtil: error: " + message.replace("\r", "\\r").replace("\n", "\\n")
    if _launched_rank() == 0:
        print(line, file=sys.stderr)
    _leave_for_the_launcher(line)


def _leave_for_the_launcher(line: str) -> None:
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as handle:
            json.dump({"message": line, "timestamp": int(time.time())}, handle)
    except OSError:
        pass  # the line on rank 0's stderr is what counts


def _launched_rank() -> int:
    """This process's rank as torchrun (RANK and WORLD_SIZE) or srun (SLURM_PROCID of a step of several tasks) set
    it, 0 otherwise: mtil.distributed's rule, read here without importing torch."""
    import os

    def number(variable: str) -> int:
        try:
            return int(os.environ.get(variable, "0"))
        except ValueError:
            return 0

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return number("RANK")
    tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in os.environ else "SLURM_NTASKS"
    if "SLURM_PROCID" in os.environ and number(tasks) > 1:
        return number("SLURM_PROCID")
    return 0


def parser_switches() -> set[str]:
    """mtil.main's flags that take no value, from the full parser (seed_flags asks when cli_spec is stale)."""
    from mtil.args import build_parser

    return {option for action in build_parser()._actions if action.nargs == 0 for option in action.option_strings}


def _answer_early(argv: Sequence[str]) -> tuple[list[str], int | None]:
    """``argv`` with the CLIP-AST seeds' spellings and Dassl overrides in mtil's names, and the exit code when it is
    answered before the model code is imported (no arguments, --help, a flag error: mtil.cli_spec), else None."""
    try:
        argv = translate_main(list(argv), parser_switches)
    except UserError as exc:
        _error(str(exc))
        return list(argv), 2
    return argv, quick_answer(argv)


def check_command_line(argv: Sequence[str]) -> int | None:
    """Every check of ``argv`` that needs no file (what ``python -m mtil.launch`` runs before starting workers):
    the exit code when the command is answered here (``--help``: 0; a refusal, printed in one line: 2), else None."""
    argv, early = _answer_early(argv)
    if early is not None:
        return early
    try:
        from mtil.args import parse_args

        parse_args(argv)
    except UserError as exc:
        _error(str(exc))
        return 2
    except SystemExit as exc:  # --help of the full parser
        return int(exc.code or 0)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run mtil; bad input ends in one line on stderr and exit code 2, never a traceback. No arguments, --help and
    a flag that does not exist are answered before the model code is imported (mtil.cli_spec)."""
    argv, early = _answer_early(sys.argv[1:] if argv is None else argv)
    if early is not None:
        return early
    try:
        from mtil.args import parse_args  # imports every method, hence torch: seconds

        args = parse_args(argv)
        return run(args)
    except UserError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:  # a full disk outside mtil's own writers (a log line, a folder), a path the file system
        cause = no_space_cause(exc)  # refuses (too long, read-only, a file where a folder must be): still one line
        error = no_space_error(None, cause) if cause is not None else path_error(exc)
        if error is None:
            raise
        _error(str(error))
        return 2
    except KeyboardInterrupt:
        print("mtil: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from mtil import jobs
    from mtil.hardware import set_threads

    set_threads(args.threads)
    if args.seeds:
        job = jobs.seeds
    elif args.summarize:
        job = jobs.summarize
    elif args.eval_single:
        job = jobs.eval_single
    elif args.eval_only or not (args.train_dataset or args.sequence):
        job = jobs.evaluate
    else:
        job = jobs.train
    if job is not jobs.train:
        from mtil.distributed import launched_world_size

        if launched_world_size() > 1:
            raise UserError(f"{launched_world_size()} processes were started (torchrun / srun), but only training "
                            f"runs on several processes: run {job.__name__.replace('_', '-')} as one process")
    if job not in (jobs.train, jobs.seeds):  # --seeds passes a stop request on to the run in progress
        from mtil.engine.preemption import release_early_handlers

        release_early_handlers()  # these jobs write no checkpoint: a stop signal ends them as usual
    return job(args)


if __name__ == "__main__":
    sys.exit(main())
