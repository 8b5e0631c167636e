"""Read the tensors of a TorchScript archive (OpenAI's released CLIP files) as data, without running its code.

``torch.jit.load`` executes the archive's TorchScript (a module's ``__setstate__`` runs on loading, and can call
``torch.from_file`` to create or overwrite files), so mtil never calls it on a user's file. A TorchScript archive
is a zip: ``<name>/data.pkl`` pickles the module tree (objects of ``__torch__.*`` classes whose state is a dict of
attributes), its tensors' bytes are entries ``<name>/data/<key>``. This module unpickles ``data.pkl`` with an
unpickler that knows only a tensor rebuild of its own, ``collections.OrderedDict`` and placeholder objects for
``__torch__`` classes (their state is stored, never handed to their code), refuses every other global, and walks
the tree for tensors: the module's parameters and buffers under their usual dotted names.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class NotTorchScript(ValueError):
    """The file is not a TorchScript archive mtil can read as data (the message says why)."""


class _ScriptObject:
    """Stands for an object of a ``__torch__`` class: keeps the pickled state, runs nothing."""

    state: Any = None  # NEWOBJ makes the object without __init__; BUILD sets this

    def __setstate__(self, state: Any) -> None:  # what BUILD calls: store, never interpret as code
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def _ordered_dict(*args: Any) -> dict:
    return dict(*args)


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return _ordered_dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            # One placeholder class per TorchScript class name, so nothing of the archive's code is reached.
            return self.classes.setdefault(f"{module}.{name}", type(name, (_ScriptObject,), {}))
        raise NotTorchScript(f"it refers to {module}.{name}, which a plain TorchScript module's weights never do")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise NotTorchScript(f"unexpected storage reference {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        try:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
        except KeyError:
            raise NotTorchScript(f"tensor data {self.prefix}/data/{key} is missing") from None
        itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
        if len(raw) < numel * itemsize:
            raise NotTorchScript(f"tensor data {self.prefix}/data/{key} is truncated")
        return torch.frombuffer(bytearray(raw[:numel * itemsize]), dtype=storage_type.dtype)


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip with a ``<name>/data.pkl`` and ``<name>/code/`` entries (what ``torch.jit.save`` writes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):  # ValueError: a damaged file name (UnicodeDecodeError)
        return False
    return any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


def _walk(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = obj.state if isinstance(obj, _ScriptObject) else None
    if not isinstance(state, dict):
        return  # a class with its own __getstate__: nothing named to read
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, _ScriptObject):
            _walk(value, key + ".", out, seen)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The module's tensors by dotted name (as ``torch.jit.load(path).state_dict()`` would give), read as data."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise NotTorchScript("it has no single <name>/data.pkl")
            prefix = pickles[0].split("/")[0]
            root = _DataOnlyUnpickler(archive.read(pickles[0]), archive, prefix).load()
    except NotTorchScript:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, RuntimeError,
            AttributeError, IndexError, KeyError) as exc:
        raise NotTorchScript(f"it is damaged ({type(exc).__name__}: {str(exc)[:80]})") from None
    tensors: dict[str, torch.Tensor] = {}
    _walk(root, "", tensors, set())
    if not tensors:
        raise NotTorchScript("it holds no named tensors")
    return tensors
