"""Is a ``torch.save`` file intact? Every record of its zip archive checked against the CRC-32 the archive holds.

``torch.save`` writes a zip whose every record (the pickle and one record per tensor storage) carries a CRC-32,
but ``torch.load`` never checks them: a checkpoint with bytes overwritten in place loads and trains on wrong
weights. This module checks them, fast enough to run on every read (the threat is damage, not tampering, so the
archive's own CRC suffices): the file is mapped, and the records' CRCs are computed in a few threads (zlib
releases the GIL), about 3.7 GB/s per core, a fraction of what ``torch.load`` itself takes (BENCHMARKS.md,
"Integrity").

An archive whose every non-empty record has CRC 0 was written without checksums (``torch.serialization.config.save
.compute_crc32 = False``); it is reported as unchecked, not damaged. Files that are not zip archives (the legacy
pickle format, TorchScript of old torch) have nothing to check here: callers decide whether to accept them.
"""
from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_PARALLEL_FROM = 8 << 20  # below this many bytes, one thread is faster than handing work to a pool


@dataclass(frozen=True)
class ArchiveCheck:
    """The outcome of :func:`check_archive`: ``damage`` is None for an intact archive (or one with no checksums,
    ``checked`` False), else what is wrong, in words fit for a one-line error."""

    damage: str | None
    checked: bool = True
    records: int = 0


def _threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def check_archive(path: str | os.PathLike) -> ArchiveCheck:
    """Check every record of the zip archive at ``path`` against its CRC-32. A file that is not a zip archive
    (too short, zeroed, truncated past its directory) is damage too: callers that also accept other formats test
    :func:`zipfile.is_zipfile` first."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            try:
                archive = zipfile.ZipFile(handle)
            except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
                return ArchiveCheck(f"not a complete zip archive ({str(exc)[:60] or type(exc).__name__})")
            with archive:
                infos = archive.infolist()
            size = os.fstat(handle.fileno()).st_size  # not 0: an empty file is no zip archive (refused above)
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _check_records(data, infos, size)
    except OSError as exc:
        return ArchiveCheck(f"cannot be read ({exc.strerror or exc})")


def _check_records(data: mmap.mmap, infos: list[zipfile.ZipInfo], size: int) -> ArchiveCheck:
    sized = [info for info in infos if info.file_size > 0]
    if sized and all(info.CRC == 0 for info in sized):
        return ArchiveCheck(None, checked=False, records=len(infos))
    spans = []
    for info in infos:
        start = info.header_offset
        if start + _LOCAL_HEADER.size > size:
            return ArchiveCheck(f"record {info.filename} lies past the end of the file")
        fields = _LOCAL_HEADER.unpack_from(data, start)
        if fields[0] != _LOCAL_SIGNATURE:
            return ArchiveCheck(f"record {info.filename} has a damaged header")
        begin = start + _LOCAL_HEADER.size + fields[9] + fields[10]
        if info.compress_type != zipfile.ZIP_STORED:
            return ArchiveCheck(f"record {info.filename} is compressed (not written by torch.save)")
        if begin + info.file_size > size:
            return ArchiveCheck(f"record {info.filename} is cut short (the file is truncated)")
        spans.append((info, begin))
    view = memoryview(data)
    try:
        def crc_matches(span: tuple[zipfile.ZipInfo, int]) -> bool:
            info, begin = span
            return zlib.crc32(view[begin:begin + info.file_size]) == info.CRC

        total = sum(info.file_size for info, _ in spans)
        if total >= _PARALLEL_FROM and _threads() > 1:
            ordered = sorted(spans, key=lambda s: -s[0].file_size)  # largest first: the threads finish together
            with ThreadPoolExecutor(_threads()) as pool:
                results = dict(zip((s[0].filename for s in ordered), pool.map(crc_matches, ordered)))
            bad = next((info.filename for info, _ in spans if not results[info.filename]), None)
        else:
            bad = next((info.filename for info, begin in spans if not crc_matches((info, begin))), None)
    finally:
        view.release()
    if bad is not None:
        return ArchiveCheck(f"record {bad} fails its CRC (bytes changed on disk)")
    return ArchiveCheck(None, records=len(spans))


def archive_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with the ``torch.save`` archive at ``path``, or None when every record matches its CRC."""
    return check_archive(path).damage
