"""Reading the YAML files users give (``--config``, ``--sequence``): one-line errors, never a traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mtil.errors import UserError


def read_yaml(path: str | Path, what: str) -> Any:
    """The document in ``path``; ``what`` names the flag in the messages (e.g. ``"--config"``)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:  # unreadable (permissions, an I/O error)
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except RecursionError:  # thousands of nested brackets
        raise UserError(f"{what} {path} is not valid YAML (nested too deeply)") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: undecodable bytes, a date like 2020-13-45, 5000 digits
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what} {path} is not valid YAML ({first})") from None
