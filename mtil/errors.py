"""The one exception type that reaches the user as a one-line message, and the full-disk case of it."""
from __future__ import annotations

import errno
from pathlib import Path

# A full device or an exhausted quota: re-running after freeing space is the fix, so the message says so.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class UserError(Exception):
    """Bad input or missing files: printed as one line, exit code 2, no traceback."""


class NoSpaceError(UserError):
    """The disk filled up while mtil wrote a file (which is left as it was before the write)."""


def no_space_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` behind ``exc``, if any. torch.save reports a failed write as a
    ``RuntimeError`` from its zip writer whose context is the ``OSError``, so the chain is followed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def no_space_error(path: str | Path | None, cause: OSError) -> NoSpaceError:
    where = f"writing {path}" if path else (f"writing {cause.filename}" if cause.filename else "writing")
    return NoSpaceError(f"no space left on the device ({where}: {cause.strerror or 'No space left on device'}); "
                        "the files written before are intact: free space and run the same command again, it "
                        "resumes from the last checkpoint")


# The file-system refusals a command line's paths can cause: each becomes one line naming the path.
_PATH_ERRORS = {errno.ENAMETOOLONG: "a file or folder name is over the file system's limit (255 bytes)",
                errno.EACCES: "permission denied", errno.EPERM: "not permitted",
                errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a part of the path is a file, not a folder",
                errno.EISDIR: "it is a folder, not a file", errno.ELOOP: "too many symbolic links"}


def path_error(exc: BaseException) -> UserError | None:
    """The one-line error for an ``OSError`` (in ``exc``'s chain) that a path caused, or None for another error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _PATH_ERRORS:
            name = str(exc.filename) if exc.filename is not None else "a path"
            shown = name if len(name) <= 120 else name[:60] + "..." + name[-40:]
            return UserError(f"{shown}: {_PATH_ERRORS[exc.errno]} ({exc.strerror}); check the paths given to mtil")
        exc = exc.__cause__ or exc.__context__
    return None

