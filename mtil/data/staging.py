"""The work folder of one ``prepare``: ``DATA/.mtil-prepare/<name>/``.

Everything is downloaded and extracted there, verified there, and only then moved into place with a rename, so a
half-downloaded or half-extracted dataset never sits where a run (or ``status``) would take it for the real one.
An interrupted prepare leaves the work folder behind; the next one keeps the downloaded files in it (torchvision
checks their md5 before reusing them; an archive it cannot check is read through first) and deletes the rest, so
that every extraction starts over. Files the user downloaded are moved in (recorded in ``.moved.json`` before the
move) and moved back to where they were when the prepare ends, however it ends.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

from mtil.atomic import atomic_open
from mtil.data.catalog import STAGING, DatasetFacts

MOVED = ".moved.json"  # staged path (relative) -> the user's original path
VERIFIED = ".verified"  # written once the staged copy passed the checks: the next run just moves it into place
_CHUNK = 1 << 24


class Staging:
    def __init__(self, location: Path, facts: DatasetFacts):
        self.location = Path(location)
        self.facts = facts
        self.root = self.location / STAGING / facts.name

    # ------------------------------------------------------------------------------------------ state
    def exists(self) -> bool:
        return self.root.is_dir()

    def verified(self) -> bool:
        return (self.root / VERIFIED).is_file() and (self.root / self.facts.folder).exists()

    def moved(self) -> dict[str, str]:
        try:
            return json.loads((self.root / MOVED).read_text())
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------------------------------ steps
    def start(self, keep: tuple[str, ...] = (), unchecked: tuple[str, ...] = ()) -> list[str]:
        """Create the work folder, or clear what an interrupted run left in it but the files at ``keep`` (and the
        user's files moved in). Kept files in ``unchecked`` (no md5 known to torchvision) are read through and
        deleted when cut short. Returns the kept files' relative paths."""
        self.root.mkdir(parents=True, exist_ok=True)
        kept = set(keep) | set(self.moved())
        for path in sorted(self.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            relative = path.relative_to(self.root).as_posix()
            if relative in (MOVED,) or relative in kept:
                continue
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink()
        for relative in unchecked:
            path = self.root / relative
            if path.is_file() and relative not in self.moved() and not archive_is_whole(path):
                path.unlink()
        return sorted(r for r in kept if (self.root / r).exists())

    def bring(self, original: Path, relative: str) -> None:
        """Move the user's file ``original`` into the work folder at ``relative`` (recorded first). A symbolic link
        stays where it is: the work folder gets a link of its own to the same file (moving a link would break a
        relative one, and restoring it compared the link's target with the link)."""
        target = self.root / relative
        if Path(original).is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            target.symlink_to(Path(original).resolve())
            return
        moved = self.moved()
        moved[relative] = os.path.abspath(original)
        with atomic_open(self.root / MOVED) as handle:
            json.dump(moved, handle, indent=1)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(original, target)

    def restore(self) -> None:
        """Move every file the user had downloaded back where it was (from the work folder or, once installed,
        from the dataset's place)."""
        for relative, original in self.moved().items():
            original = Path(original)
            for current in (self.root / relative, self.location / relative):
                if current.is_file() and not current.is_symlink() and Path(os.path.abspath(current)) != original:
                    original.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(current, original)
                    break
        (self.root / MOVED).unlink(missing_ok=True)

    def mark_verified(self) -> None:
        (self.root / VERIFIED).touch()

    def install(self) -> None:
        """Move the verified folder into the data folder. A folder already there holds no data (the checks before
        a prepare refuse one that does), at most downloaded files: the two are merged."""
        _merge(self.root / self.facts.folder, self.location / self.facts.folder)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        parent = self.root.parent
        try:
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        except OSError:
            pass


def _merge(source: Path, target: Path) -> None:
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return
    for child in source.iterdir():
        destination = target / child.name
        if child.is_dir() and destination.is_dir():
            _merge(child, destination)
        else:
            os.replace(child, destination)
    source.rmdir()


def archive_is_whole(path: Path) -> bool:
    """Whether the archive reads to its end (a download cut short does not): gzip's and zip's checksums."""
    try:
        name = path.name.lower()
        if name.endswith((".gz", ".tgz")):
            with gzip.open(path, "rb") as handle:
                while handle.read(_CHUNK):
                    pass
        elif name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
        elif name.endswith(".tar"):
            with tarfile.open(path) as archive:
                for _ in archive:
                    pass
        return True
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError):
        return False
