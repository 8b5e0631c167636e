"""The files of tensors mtil writes and later trusts (checkpoints, feature-cache entries, IMO adapters, OGD bases):
written with a checksum of every tensor, read back verified.

``torch.save`` records a CRC-32 per zip record, but ``torch.load`` checks none of them, and a CRC over 1.8 GB (a
ViT-B/32 checkpoint with its optimiser) costs more than half of the load itself on two cores. So each file
carries, under :data:`CHECKSUM_KEY`, a block sum of every tensor's bytes (64-bit words summed in blocks of
4 KiB, and the block sums summed plain and weighted by position: any changed word changes the first sum, a
moved block the second). Reading maps the file (``mmap=True``), copies each storage out of the mapping and sums
it while it is in cache, which together costs no more than a plain ``torch.load`` (BENCHMARKS.md, "Integrity").
The small records that are not tensor data (the pickle: every number and string of the payload) are checked
against their zip CRC. A file written before the checksums existed is checked against every record's zip CRC.

The threat is damage (a disk, a copy, a kill during a write that something else then touched), not tampering.
Payloads are dicts of tensors and plain values, as ``weights_only`` loading accepts.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from mtil.archive_check import archive_damage
from mtil.errors import UserError

CHECKSUM_KEY = "_mtil_checksums"
ALGORITHM = "block-sum-64/1"
_BLOCK = 512  # 64-bit words per block: 4 KiB, a disk block


class DamagedFile(UserError):
    """A file that no longer holds what was written: cut short, zeroed, or bytes that fail their checksum."""


class UnreadableFile(UserError):
    """An intact archive that ``weights_only`` loading refuses or cannot read: not a file of tensors and plain
    values (a foreign pickle, another program's archive)."""


def payload_tensors(payload: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a payload of dicts, lists and tuples, with its path (``model/visual.proj``), in the order
    ``torch.save`` writes and ``torch.load`` restores them (dicts keep their order through pickling)."""
    if isinstance(payload, torch.Tensor):
        yield prefix, payload
    elif isinstance(payload, dict):
        for key, value in payload.items():
            if key != CHECKSUM_KEY:
                yield from payload_tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(payload, (list, tuple)):
        for index, value in enumerate(payload):
            yield from payload_tensors(value, f"{prefix}/{index}" if prefix else str(index))


def tensor_checksum(tensor: torch.Tensor) -> tuple[int, int, int]:
    """Three numbers for ``tensor``'s bytes: the byte count, the wrapping 64-bit sum of its 8-byte words, and
    the sum of its 4 KiB blocks' sums weighted by position (integer sums wrap the same way in any order, so the
    numbers depend neither on threads nor on the device)."""
    data = tensor.detach()
    if data.is_sparse or data.is_quantized:
        data = data.to_dense() if data.is_sparse else data.int_repr()
    data = data.contiguous().reshape(-1).view(torch.uint8)
    if data.storage_offset() % 8:
        data = data.clone()
    size = data.numel()
    whole = size - size % 8
    words = data[:whole].view(torch.int64)
    blocks = words.numel() // _BLOCK
    tail = words[blocks * _BLOCK:].sum()
    if whole < size:  # the last bytes of a size not a multiple of 8
        tail = tail + (data[whole:].to(torch.int64) << 32).sum()
    if blocks == 0:
        return size, int(tail), int(tail)
    block_sums = words[:blocks * _BLOCK].view(blocks, _BLOCK).sum(1)
    weights = torch.arange(1, blocks + 1, dtype=torch.int64, device=block_sums.device)
    pair = torch.stack([block_sums.sum() + tail, (block_sums * weights).sum() + tail * (blocks + 1)]).tolist()
    return size, pair[0], pair[1]


def checksums(payload: Any) -> torch.Tensor:
    """One row of :func:`tensor_checksum` per tensor of ``payload`` (int64)."""
    rows = [tensor_checksum(t) for _, t in payload_tensors(payload)]
    return torch.tensor(rows, dtype=torch.int64) if rows else torch.zeros(0, 3, dtype=torch.int64)


def with_checksums(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its tensors' checksums added (what :func:`save_tensors` writes)."""
    return {**payload, CHECKSUM_KEY: {"algorithm": ALGORITHM, "values": checksums(payload)}}


def save_tensors(payload: dict[str, Any], handle: IO[bytes] | str | os.PathLike) -> None:
    """``torch.save`` of ``payload`` with its checksums (write through :func:`mtil.atomic.atomic_open`)."""
    torch.save(with_checksums(payload), handle)


def _small_records_damage(path: Path) -> str | None:
    """The zip CRC of every record that is not tensor data (the pickle, the version): small, so read whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                parts = info.filename.split("/")
                if len(parts) >= 3 and parts[-2] == "data" and parts[-1].isdigit():
                    continue  # a tensor's storage: its checksum is in the payload
                archive.read(info)  # raises BadZipFile on a CRC mismatch
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        return f"its zip records cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def _copy_out(payload: Any) -> tuple[Any, list[tuple[str, tuple[int, int, int]]]]:
    """The payload with every storage copied out of the file's mapping into memory, views kept as views (one copy
    per storage, as a plain load gives), and each tensor's (path, checksum), summed right after its copy while its
    bytes are in cache; the checksum record itself is copied, not summed."""
    copies: dict[int, torch.UntypedStorage] = {}
    sums: list[tuple[str, tuple[int, int, int]]] = []

    def copy(value: Any, path: str, summed: bool) -> Any:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            new = copies.get(storage.data_ptr())
            if new is None:
                new = copies[storage.data_ptr()] = storage.clone()
            out = torch.empty(0, dtype=value.dtype).set_(new, value.storage_offset(), value.size(), value.stride())
            if isinstance(value, torch.nn.Parameter):
                out = torch.nn.Parameter(out, requires_grad=value.requires_grad)
            if summed:
                sums.append((path, tensor_checksum(out)))
            return out
        if isinstance(value, dict):
            out_dict = {} if type(value) is dict else type(value)()
            for key, item in value.items():
                out_dict[key] = copy(item, f"{path}/{key}" if path else str(key), summed and key != CHECKSUM_KEY)
            return out_dict
        if isinstance(value, (list, tuple)):
            items = [copy(v, f"{path}/{i}" if path else str(i), summed) for i, v in enumerate(value)]
            if isinstance(value, list):
                return items
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    return copy(payload, "", True), sums


def _recorded_checksums(payload: dict[str, Any]) -> torch.Tensor | None:
    entry = payload.get(CHECKSUM_KEY)
    if entry is None:
        return None
    values = entry.get("values") if isinstance(entry, dict) else None
    if entry.get("algorithm") != ALGORITHM or not isinstance(values, torch.Tensor) or values.dim() != 2 \
            or values.shape[1:] != (3,) or values.dtype != torch.int64:
        raise ValueError("its checksum record is damaged")
    return values


def load_tensors(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a file :func:`save_tensors` (or an older mtil, or any ``torch.save``) wrote, verified: a
    :class:`DamagedFile` naming ``what``, the path and what is wrong when it is not intact. Returns the payload
    without its checksums."""
    path = Path(path)
    try:
        complete = zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:  # is_zipfile lets some damage through as these
        raise DamagedFile(f"{what} {path} is damaged: its zip directory cannot be read ({exc})") from None
    if not complete:
        raise DamagedFile(f"{what} {path} is damaged: not a complete zip archive (truncated, zeroed or not written "
                          f"by torch.save)")
    damage = _small_records_damage(path)
    if damage is not None:
        raise DamagedFile(f"{what} {path} is damaged: {damage}")
    try:
        try:
            mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            payload, sums = _copy_out(mapped)
            del mapped
        except RuntimeError:  # a file torch cannot map (written by a torch without aligned records): read it
            payload = torch.load(path, map_location="cpu", weights_only=True)
            sums = None
    except Exception as exc:  # noqa: BLE001 - the pickle passed its CRC: this is what was written, not damage
        raise UnreadableFile(f"cannot read {what} {path} ({_reason(exc)})") from None
    try:
        recorded = _recorded_checksums(payload) if isinstance(payload, dict) else None
    except ValueError as exc:
        raise DamagedFile(f"{what} {path} is damaged: {exc}") from None
    if recorded is None:  # written before checksums: every record against its zip CRC
        damage = archive_damage(path)
        if damage is not None:
            raise DamagedFile(f"{what} {path} is damaged: {damage}")
        return payload
    if sums is None:
        sums = [(name, tensor_checksum(tensor)) for name, tensor in payload_tensors(payload)]
    if len(sums) != recorded.shape[0]:
        raise DamagedFile(f"{what} {path} is damaged: it holds {len(sums)} tensors, its checksums "
                          f"{recorded.shape[0]}")
    for (name, actual), expected in zip(sums, recorded.tolist()):
        if list(actual) != expected:
            raise DamagedFile(f"{what} {path} is damaged: tensor {name} does not match its checksum (bytes "
                              f"changed on disk)")
    payload.pop(CHECKSUM_KEY)
    return payload


def _reason(exc: BaseException) -> str:
    """Why ``torch.load`` refused a file, in a few words (its own message runs to many lines)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a torch.save file of tensors and plain values: weights_only loading refuses it"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:100]}"


def read_tensor_file(path: str | os.PathLike, what: str) -> Any:
    """A file of tensors from anywhere (mtil's, a user's): a zip archive (every ``torch.save`` since torch 1.6)
    through :func:`load_tensors`, verified; torch's legacy format, which holds no checksum, read ``weights_only``.
    Every failure is a one-line :class:`~mtil.errors.UserError` naming ``what`` and the path."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            legacy = handle.read(2) not in (b"PK", b"")
    except OSError as exc:
        raise UnreadableFile(f"cannot read {what} {path} ({exc.strerror or exc})") from None
    if not legacy:
        return load_tensors(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a foreign pickle, random bytes, ...
        raise UnreadableFile(f"cannot read {what} {path} ({_reason(exc)})") from None


def file_damage(path: str | os.PathLike, what: str = "file") -> str | None:
    """What is wrong with the file at ``path`` (a :func:`load_tensors` check; ``what`` names it in the message),
    or None when it is intact."""
    try:
        load_tensors(path, what)
    except (DamagedFile, UnreadableFile) as exc:
        return str(exc)
    return None
