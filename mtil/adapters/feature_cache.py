"""A store of encoded image features on disk (``--feature-cache DIR``), so that a dataset's images go through the
image encoder once per set of weights, across runs.

An entry is keyed by a SHA-256 of (a fingerprint of the model's image encoder, a salt such as the precision, and
a descriptor: a JSON-able dict naming what was encoded: dataset, split, classes, the features' kind, sampling,
few-shot draw, augmentation, ...). The fingerprint is a SHA-256 of ``model.visual``'s state (names, dtypes,
shapes and bytes of every tensor), computed once per model *version* (the evaluator's ``model_version``, bumped
whenever the weights may have moved), so features are never reused across different weights, and equal weights
(e.g. a second run from the same checkpoint) find them. A head whose features depend on anything outside
``model.visual`` must say so in its ``feature_id`` (the descriptor holds it).

Files: ``DIR/<first two hex digits>/<key>.pt``, plain tensors and strings with their checksums, written atomically
(:mod:`mtil.atomic`) and read back verified (:mod:`mtil.tensor_files`: bytes changed on disk are caught, not
used). A damaged or mismatching file is ignored with a warning
(the caller recomputes and the new entry replaces it); a failed write is a warning too: the store is an
optimisation, never a reason to stop a run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mtil.atomic import atomic_open
from mtil.errors import UserError
from mtil.models.backend import image_spec
from mtil.tensor_files import load_tensors, save_tensors

FORMAT = "mtil-features"
VERSION = 1


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the image encoder's state (what image features depend on)."""
    digest = hashlib.sha256()
    visual = getattr(model, "visual", model)
    if hasattr(visual, "input_resolution"):  # clip-anytorch's towers: the key entries kept before back-ends
        digest.update(f"{type(visual).__name__}:{visual.input_resolution}".encode())
    else:  # open_clip's: its preprocessing too (SigLIP normalises differently)
        digest.update(f"{type(visual).__module__}.{type(visual).__name__}:{image_spec(model)}".encode())
    for name, tensor in visual.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"|{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _describe(descriptor: dict[str, Any]) -> str:
    return json.dumps(descriptor, sort_keys=True, default=str)


def _warn(message: str) -> None:
    print(f"mtil: warning: {message}", file=sys.stderr, flush=True)


class FeatureStore:
    """``load(model, version, descriptor) -> (features, labels) | None`` and ``save(model, version, descriptor,
    features, labels)``: the interface :class:`~mtil.evaluation.zeroshot.ZeroShotEvaluator` calls as its
    ``feature_store``. ``features`` has the images along its second-to-last dimension (N x D, or V x N x D for
    several augmented views), ``labels`` is N long. Counts its hits, misses and writes."""

    def __init__(self, root: str | Path, salt: str = ""):
        self.root = Path(root)
        self.salt = salt
        self.hits = self.misses = self.writes = self.damaged = 0
        self._fingerprints: "weakref.WeakKeyDictionary[nn.Module, tuple[int, str]]" = weakref.WeakKeyDictionary()

    def fingerprint(self, model: nn.Module, version: int) -> str:
        """The model's fingerprint, hashed once per (model, version)."""
        known = self._fingerprints.get(model)
        if known is None or known[0] != version:
            known = (version, model_fingerprint(model))
            self._fingerprints[model] = known
        return known[1]

    def path(self, model: nn.Module, version: int, descriptor: dict[str, Any]) -> Path:
        key = hashlib.sha256(_describe({"model": self.fingerprint(model, version), "salt": self.salt,
                                        "descriptor": descriptor}).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.pt"

    def load(self, model: nn.Module, version: int,
             descriptor: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(model, version, descriptor)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = load_tensors(path, "feature cache file")
            features, labels = _checked(entry, _describe(descriptor))
        except Exception as exc:  # any damage: a truncated file, changed bytes, a foreign pickle, wrong contents
            self.damaged += 1
            self.misses += 1
            # mtil's own message names the file already and is whole (cutting it at a fixed length lost its end
            # under a long path); a foreign exception is cut, since it may quote a whole pickle
            if isinstance(exc, UserError):
                message = f"{exc}, so it cannot be used"
            else:
                message = f"feature cache file {path} cannot be used ({type(exc).__name__}: {str(exc)[:120]})"
            _warn(f"{message}; the features are computed again and replace it")
            return None
        self.hits += 1
        return features, labels

    def save(self, model: nn.Module, version: int, descriptor: dict[str, Any], features: torch.Tensor,
             labels: torch.Tensor) -> None:
        path = self.path(model, version, descriptor)
        entry = {"format": FORMAT, "version": VERSION, "descriptor": _describe(descriptor),
                 "features": features.detach().cpu().contiguous(), "labels": labels.detach().cpu().long()}
        try:
            with atomic_open(path, "wb") as handle:
                save_tensors(entry, handle)
        except (OSError, UserError) as exc:
            _warn(f"could not write the feature cache file {path} ({exc}); the run goes on without it")
            return
        self.writes += 1


def _checked(entry: Any, descriptor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (features, labels) of a stored entry, or ValueError when it is not one this store wrote for
    ``descriptor``."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("version") != VERSION:
        raise ValueError("not an mtil feature-cache entry of this version")
    if entry.get("descriptor") != descriptor:
        raise ValueError("the entry describes other features")
    features, labels = entry.get("features"), entry.get("labels")
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("features or labels are missing")
    if not features.is_floating_point() or features.dim() < 2 or labels.dim() != 1 \
            or features.shape[-2] != labels.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} do not fit labels {tuple(labels.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("the features hold non-finite values")
    return features, labels


def check_cache_dir(text: str | None) -> None:
    """``--feature-cache DIR``: a folder (created at the first write) or a path that is not there yet."""
    if text is not None and Path(text).exists() and not Path(text).is_dir():
        raise UserError(f"--feature-cache {text} is a file, not a folder: give a folder (it is created when "
                        f"missing)")


def store_of(config: argparse.Namespace, salt: str = "") -> FeatureStore | None:
    """The run's store when ``--feature-cache`` is given, else None."""
    root = getattr(config, "feature_cache", None)
    return FeatureStore(root, salt) if root else None
