"""A run's voice: ``train.log`` in the save folder, and stdout on rank 0."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from mtil.distributed import is_main
from mtil.errors import no_space_cause, no_space_error


class _LogFile(logging.FileHandler):
    """``train.log``; a full disk stops the run with mtil's one line instead of logging's traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:
        cause = no_space_cause(sys.exc_info()[1])
        if cause is not None:
            raise no_space_error(self.baseFilename, cause) from None
        super().handleError(record)


def open_log(save_dir: Path | None) -> logging.Logger:
    """The ``mtil.train`` logger, writing to ``<save_dir>/train.log`` (nowhere without a folder)."""
    log = logging.getLogger("mtil.train")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        handler = _LogFile(save_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    return log


def say(log: logging.Logger, message: str) -> None:
    """Print (rank 0 speaks for all processes: only it has a train.log) and log ``message``."""
    if is_main():
        print(message, flush=True)
    log.info(message)
