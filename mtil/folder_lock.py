"""One run per folder: a process that writes into a ``--save`` folder holds ``<folder>/.mtil.lock``.

The lock is an exclusive ``flock`` on that file, which the kernel releases when the process ends however it ends
(``kill -9`` included), so a lock left by a dead process is simply taken over. The file says who holds it (pid,
host, command, since when), for the one-line refusal a second process gets. It is removed on every ordinary exit.
On a file system without ``flock`` (some network mounts) the lock degrades to the pid check on the same host.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mtil.errors import UserError

LOCK_NAME = ".mtil.lock"


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0))) if info.get("since") else "?"
    return f"process {info.get('pid', '?')} on {info.get('host', '?')} (since {since}: {info.get('command', '?')})"


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8", errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive_here(info: dict) -> bool:
    """The holder named in the file is a live process on this host (the check without flock)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(folder: Path) -> dict | None:
    """Who holds ``folder``'s lock now (None: nobody, or a dead process). Takes nothing."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(path)  # held
    except OSError:  # no flock here: the pid check
        info = _read(path)
        return info if _alive_here(info) else None
    finally:
        os.close(fd)
    return None


def refuse_if_held(folder: Path, flag: str = "--save") -> None:
    """One line when another live process holds ``folder`` (a check that writes nothing)."""
    info = holder(folder)
    if info is not None and info.get("pid") != os.getpid():
        raise UserError(f"{flag} {folder} is in use by {_describe(info)}: one run per folder; wait for it to "
                        f"end, stop it, or use another {flag}")


class FolderLock:
    """Hold ``folder``'s lock until :meth:`release` (also run at exit)."""

    def __init__(self, folder: Path, flag: str = "--save"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.flag} {self.folder} is in use by {_describe(_read(self.path))}: one run "
                                f"per folder; wait for it to end, stop it, or use another {self.flag}") from None
            except OSError:  # no flock on this file system: fall back to the pid written in the file
                info = _read(self.path)
                if _alive_here(info) and info.get("pid") != os.getpid():
                    os.close(fd)
                    raise UserError(f"{self.flag} {self.folder} is in use by {_describe(info)}: one run per "
                                    f"folder; wait for it to end, stop it, or use another {self.flag}") from None
            try:  # the file we locked is still the one at the path (a holder may have removed it meanwhile)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        atexit.register(self.release)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # removed while still locked: no one takes a half-released lock
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        atexit.unregister(self.release)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
