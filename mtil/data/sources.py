"""Files the user downloaded for a dataset, found in the data folder (read only).

A torchvision archive counts where torchvision keeps it (``DATA/dtd/dtd-r1.0.1.tar.gz``) or at the top of the
data folder under its own name (``DATA/dtd-r1.0.1.tar.gz``); the files of the datasets torchvision cannot download
(ImageNet, Stanford Cars, Conceptual Captions) at the top of the data folder or in the dataset's folder.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from mtil.data.catalog import TORCHVISION, DatasetFacts


def archive_candidates(location: Path, relative: str) -> list[Path]:
    """Where a user's copy of the torchvision archive at ``relative`` may be."""
    places = [location / relative, location / PurePosixPath(relative).name]
    return list(dict.fromkeys(places))


def found_sources(facts: DatasetFacts, location: Path) -> dict[str, Path]:
    """Downloaded file (its path relative to the data folder for torchvision's archives, else its name) -> where
    it is, for those found."""
    found: dict[str, Path] = {}
    if facts.kind == TORCHVISION:
        for archive in facts.archives:
            path = next((p for p in archive_candidates(location, archive.path) if p.is_file()), None)
            if path is not None:
                found[archive.path] = path
        return found
    for name in facts.sources:
        path = next((p for p in (location / name, location / facts.folder / name) if p.is_file()), None)
        if path is not None:
            found[name] = path
    return found
