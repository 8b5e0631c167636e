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
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
