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
