"""Complete, atomic, weights-only checkpoints.

A checkpoint is a plain dict of tensors and Python values (no pickled objects): model and head state dicts,
optimiser, scheduler, method states, RNG states, counters and the resolved configuration. It is written to a
temporary file and renamed, and read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtil.atomic import atomic_open
from mtil.errors import UserError

FORMAT = "mtil-checkpoint"
VERSION = 1
LATEST = "latest.pth"

# Flags that change how a run executes but not what it computes: they may differ on resume.
OPERATIONAL_FLAGS = {
    "workers", "device", "batch_size_eval", "save", "data_location", "clip_root", "download", "force_resume",
    "checkpoint_interval", "eval_only", "summarize", "eval_single", "class_names", "prompt",
}


def capture_rng() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    rng = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def config_for_checkpoint(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as plain values (what weights_only loading accepts)."""
    def plain(value):
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value)

    return {k: plain(v) for k, v in config.items()}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ. A flag newer than the checkpoint counts only when it is not at its default; a flag
    that no longer exists is ignored."""
    from mtil.args import build_parser

    parser = build_parser()
    keys = set(current) - OPERATIONAL_FLAGS
    differences = []
    for key in keys:
        if key not in saved:
            if current.get(key) != config_for_checkpoint({key: parser.get_default(key)})[key]:
                differences.append(key)
        elif saved.get(key) != current.get(key):
            differences.append(key)
    return sorted(differences)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path} ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not an mtil checkpoint")
    return payload
