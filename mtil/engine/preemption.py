"""SLURM preemption: on SIGUSR1 (``#SBATCH --signal=USR1@120``) or SIGTERM, save and exit at the next step."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

PREEMPTED_EXIT_CODE = 3  # "checkpoint saved; re-run the same command to resume" (train.sh requeues on it)


class Preempted(Exception):
    """Raised by the loop after it saved the latest checkpoint in answer to a stop request."""


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def request(self, signum: int = 0, frame=None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name if signum else "request"


@contextmanager
def stop_on_signals(flag: StopFlag, signals=(signal.SIGUSR1, signal.SIGTERM)) -> Iterator[StopFlag]:
    """Install handlers that only set ``flag`` (the loop saves at a step boundary, never mid-update)."""
    previous = {}
    for sig in signals:
        try:
            previous[sig] = signal.signal(sig, flag.request)
        except ValueError:  # not the main thread (e.g. inside some test runners): no handler
            pass
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
