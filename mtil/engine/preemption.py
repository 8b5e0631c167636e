"""SLURM preemption: on SIGUSR1 (``#SBATCH --signal=USR1@90`` as in train.sh) or SIGTERM, save and exit at the next step."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

PREEMPTED_EXIT_CODE = 3  # "checkpoint saved; re-run the same command to resume" (train.sh requeues on it)


class Preempted(Exception):
    """Raised by the loop after it saved the latest checkpoint in answer to a stop request."""


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.signum = 0

    def request(self, signum: int = 0, frame=None) -> None:
        self.requested = True
        self.signum = signum
        self.signal_name = signal.Signals(signum).name if signum else "request"


# A signal that arrives while the process is still starting (importing torch takes seconds) must not kill it:
# ``python -m mtil.main`` installs these handlers first, and a training run takes the request over.
EARLY = StopFlag()


def install_early_handlers() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, EARLY.request)


def release_early_handlers() -> None:
    """For jobs that write no checkpoint: the default handling again, and a signal that came during start-up ends
    the process as it would have."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    if EARLY.requested:
        os.kill(os.getpid(), EARLY.signum)


INTERRUPT_EXIT_CODE = 130  # a Ctrl-C, saved or not (the shell's convention for SIGINT)


def interrupt_handler(flag: StopFlag) -> Callable[[int, Any], None]:
    """Ctrl-C (SIGINT) saves as SIGTERM does: the first asks the loop to save at the next step boundary and stop;
    a second one, or one after another stop request, quits at once (KeyboardInterrupt; atomic writes leave no
    half-written file)."""
    owner = os.getpid()  # forked DataLoader workers inherit the handler: only this process speaks and stops

    def handle(signum: int, frame) -> None:
        if os.getpid() != owner:
            return
        if flag.requested:
            raise KeyboardInterrupt
        flag.request(signum)
        print("mtil: Ctrl-C: saving at the next step or row, then stopping (Ctrl-C again to quit at once, without "
              "saving)", file=sys.stderr, flush=True)

    return handle


@contextmanager
def stop_on_signals(flag: StopFlag, signals=STOP_SIGNALS, interrupt: bool = False) -> Iterator[StopFlag]:
    """Install handlers that only set ``flag`` (the loop saves at a step boundary, never mid-update); a signal
    caught during start-up counts as a request. ``interrupt``: Ctrl-C too (:func:`interrupt_handler`)."""
    if EARLY.requested and not flag.requested:
        flag.request(EARLY.signum)
    handlers = {sig: flag.request for sig in signals}
    if interrupt:
        handlers[signal.SIGINT] = interrupt_handler(flag)
    previous = {}
    for sig, handler in handlers.items():
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside some test runners): no handler
            pass
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PARENT_ENV = "MTIL_STOP_WITH_PARENT"  # set by mtil.sweep (and --seeds) for the mtil processes it starts


def stop_with_parent(poll_seconds: float = 0.5) -> threading.Thread | None:
    """When ``MTIL_STOP_WITH_PARENT`` names this process's parent, a daemon thread sends this process SIGTERM once
    the parent is gone (a ``kill -9`` of the sweep): a training run then saves at its next step boundary and exits,
    instead of writing on into a point folder that a resumed sweep will use."""
    try:
        parent = int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        return None
    if parent != os.getppid():  # not started by that process (or it is already gone): stop now
        os.kill(os.getpid(), signal.SIGTERM)
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="mtil-parent-watch", daemon=True)
    thread.start()
    return thread

