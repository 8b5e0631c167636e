"""Ways a file on disk gets damaged, for tests: truncated, zeroed, and bytes overwritten in place inside a zip
archive that stays valid (its directory intact, so ``torch.load`` reads it without complaint)."""
from __future__ import annotations

import random
import struct
import zipfile
from pathlib import Path

KINDS = ("truncated", "zeroed", "overwritten", "pickle-overwritten")


def record_span(path: Path, pick) -> tuple[str, int, int]:
    """(name, first byte, size) of the largest record of the zip at ``path`` for which ``pick(name)`` holds."""
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if pick(i.filename) and i.file_size > 0]
    info = max(infos, key=lambda i: i.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.filename, info.header_offset + 30 + name_length + extra_length, info.file_size


def is_storage(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 3 and parts[-2] == "data" and parts[-1].isdigit()


def overwrite_in_place(path: Path, nbytes: int = 64, seed: int = 0, pick=is_storage) -> str:
    """Overwrite ``nbytes`` in the middle of the largest record ``pick`` selects with other bytes (each byte
    changed); returns the record's name. The archive's directory is untouched."""
    name, start, size = record_span(path, pick)
    data = bytearray(path.read_bytes())
    at = start + max(0, size // 2 - nbytes // 2)
    rng = random.Random(seed)
    for i in range(at, min(at + nbytes, start + size)):
        data[i] = (data[i] + rng.randrange(1, 256)) % 256
    path.write_bytes(bytes(data))
    return name


def damage(path: Path, kind: str, seed: int = 0) -> None:
    """Damage ``path`` in one of :data:`KINDS`."""
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "zeroed":
        path.write_bytes(bytes(len(data)))
    elif kind == "overwritten":
        overwrite_in_place(path, seed=seed)
    elif kind == "pickle-overwritten":  # a number inside the pickle: torch.load still succeeds on many such bytes
        overwrite_in_place(path, nbytes=1, seed=seed, pick=lambda n: n.endswith("data.pkl"))
    else:
        raise ValueError(kind)
