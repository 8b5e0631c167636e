"""Run a sweep's points, or resume them: a finished point is skipped, an interrupted one runs again (an mtil run
resumes from its ``--save`` folder).

A point is finished when its command exited 0: the runner then writes ``<point>/sweep_point.json`` with the
command. On the next run a point whose file records the same command is skipped; any other point runs (a changed
command on a finished mtil run is refused by mtil itself, with the differences). Each point's output goes to
``<point>/sweep.log`` (appended, so a resumed point keeps its history) and, when points run one at a time, to the
terminal too. SIGTERM or SIGUSR1 (SLURM's preemption notice) is passed on to the running points, which save and
exit 3; no further point starts, and the sweep exits 3 so that a requeued job resumes it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mtil.atomic import atomic_open
from mtil.engine.preemption import EARLY, PARENT_ENV, PREEMPTED_EXIT_CODE, STOP_SIGNALS
from mtil.folder_lock import holder
from mtil.sweep.command import PointCommand

MARKER = "sweep_point.json"
LOG = "sweep.log"


@dataclass
class Outcome:
    command: PointCommand
    status: str  # skipped (finished before), finished, failed, interrupted, not started
    code: int | None = None
    seconds: float = 0.0


def is_finished(command: PointCommand) -> bool:
    """The point finished before with this very command."""
    try:
        record = json.loads((command.save / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("command") == command.argv


def _wait_for_folder(folder: Path, patience: float = 120.0) -> None:
    """A point folder still held by a live process (the child of a killed sweep, stopping and saving): wait for it
    rather than start a second run there (which its lock would refuse)."""
    deadline, said = time.monotonic() + patience, False
    while (info := holder(folder)) is not None and time.monotonic() < deadline:
        if not said:
            print(f"mtil.sweep: {folder} is still held by process {info.get('pid')} (stopping); waiting for it",
                  flush=True)
            said = True
        time.sleep(0.5)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


class Runner:
    """Runs points ``parallel`` at a time; ``report(outcome, index)`` is called as each ends (under a lock)."""

    def __init__(self, commands: list[PointCommand], parallel: int = 1,
                 report: Callable[[Outcome, int, int], None] | None = None, stop_on_failure: bool = False):
        self.commands = commands
        self.parallel = max(1, parallel)
        self.stop_on_failure = stop_on_failure  # e.g. --seeds: a failing seed would fail the same way again
        self.report = report or (lambda outcome, index, total: None)
        self.stopping = False
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def _stop(self, signum: int, frame=None) -> None:
        self.stopping = True
        with self._lock:
            for process in self._live:
                if process.poll() is None:
                    process.send_signal(signum)

    def _one(self, index: int) -> Outcome:
        command = self.commands[index]
        if is_finished(command):
            outcome = Outcome(command, "skipped", 0)
        elif self.stopping:
            outcome = Outcome(command, "not started")
        else:
            outcome = self._launch(command)
            if outcome.status == "failed" and self.stop_on_failure:
                self.stopping = True
        with self._lock:
            self.report(outcome, index, len(self.commands))
        return outcome

    def _launch(self, command: PointCommand) -> Outcome:
        command.save.mkdir(parents=True, exist_ok=True)
        _wait_for_folder(command.save)
        echo = self.parallel == 1
        start = time.perf_counter()
        with (command.save / LOG).open("a", encoding="utf-8") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {command.text}\n")
            log.flush()
            with self._lock:
                if self.stopping:
                    return Outcome(command, "not started")
                process = subprocess.Popen(command.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, errors="replace", bufsize=1,  # lines as they come; the point
                                           env={**os.environ, "PYTHONUNBUFFERED": "1",  # stops when this sweep dies
                                                PARENT_ENV: str(os.getpid())})
                self._live.add(process)
            for line in process.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = process.wait()
            with self._lock:
                self._live.discard(process)
        seconds = time.perf_counter() - start
        if code == 0:
            with atomic_open(command.save / MARKER, "w") as handle:
                json.dump({"command": command.argv, "seconds": round(seconds, 1),
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, handle, indent=1)
            return Outcome(command, "finished", code, seconds)
        return Outcome(command, "interrupted" if code == PREEMPTED_EXIT_CODE else "failed", code, seconds)

    def run(self) -> list[Outcome]:
        previous = {}
        for sig in STOP_SIGNALS:
            try:
                previous[sig] = signal.signal(sig, self._stop)
            except ValueError:  # not the main thread: no forwarding
                pass
        if EARLY.requested:  # a stop request while mtil was starting (python -m mtil.main --seeds)
            self.stopping = True
        try:
            with ThreadPoolExecutor(max_workers=self.parallel) as pool:
                return list(pool.map(self._one, range(len(self.commands))))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def outcome_line(outcome: Outcome, index: int, total: int, results: str = "") -> str:
    """``[2/6] shots=1_lr=1e-4_seed1: finished in 1m02s (ToyColorB val 75.00 test 80.00)``."""
    name = outcome.command.point.name or str(outcome.command.save)
    head = f"[{index + 1}/{total}] {name}: "
    if outcome.status == "finished":
        return head + f"finished in {_duration(outcome.seconds)}" + (f" ({results})" if results else "")
    if outcome.status == "skipped":
        return head + "finished before, skipped" + (f" ({results})" if results else "")
    if outcome.status == "not started":
        return head + "not started"
    log = outcome.command.save / LOG
    if outcome.status == "interrupted":
        return head + f"interrupted (exit {outcome.code}); run the sweep again to resume it; log {log}"
    return head + f"FAILED (exit {outcome.code}); see {log}"
