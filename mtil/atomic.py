"""Atomic file writes: a crash or a full disk never leaves a half-written checkpoint or metrics file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from mtil.errors import no_space_cause, no_space_error


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file 0600; a file written here gets the mode open() would give it: the mode of the file it
# replaces, else 0666 less the umask (so group members of a shared results folder can read checkpoints).
DEFAULT_MODE = 0o666 & ~_process_umask()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside ``path``, then rename over it (rename is atomic on POSIX). A full disk
    leaves ``path`` untouched and raises :class:`~mtil.errors.NoSpaceError` naming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # no inode or block left for even an empty file
        cause = no_space_cause(exc)
        if cause is not None:
            raise no_space_error(path, cause) from None
        raise
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else DEFAULT_MODE)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = no_space_cause(exc)
        if cause is not None:  # ``path`` is as it was: the temporary file is gone, the rename never happened
            raise no_space_error(path, cause) from None
        raise
