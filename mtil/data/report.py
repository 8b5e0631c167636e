"""The printed answer of ``status``: one row per dataset, then how to get each missing one and what to do about
each damaged one."""
from __future__ import annotations

from pathlib import Path

from mtil.data.catalog import CATALOG, GENERATED, MTIL_ELEVEN, TORCHVISION, expected_images
from mtil.data.check import DAMAGED, MISSING, PRESENT, Status
from mtil.data.prepare import command, download_hint, manual_hint
from mtil.data.sources import found_sources
from mtil.data.staging import Staging


def _found_images(status: Status) -> str:
    if not status.images:
        return "-"
    if "captions" in status.images:
        return f"{status.images['captions']:,} captions"
    if CATALOG[status.name].seeded:
        return f"{sum(status.images.values()):,}"
    return ", ".join(f"{split} {count:,}" for split, count in status.images.items())


def _row(status: Status) -> str:
    facts = CATALOG[status.name]
    if facts.kind == GENERATED:
        return f"  {status.name:<20}{status.state:<9}generated in memory"
    images = f"{_found_images(status)} / {expected_images(facts)}"
    classes = "" if facts.classes is None else \
        f"{'-' if status.classes is None else status.classes} / {facts.classes}"
    return f"  {status.name:<20}{status.state:<9}{images:<44} {classes}".rstrip()


HEADER = f"  {'dataset':<20}{'state':<9}{'images found / in a complete copy':<44} classes found / complete"


def how_to_get(status: Status, location: Path, flag: str) -> str:
    """The command or the place that gets a missing dataset (one line)."""
    facts = CATALOG[status.name]
    staging = Staging(location, facts)
    if staging.exists():
        return f"an interrupted prepare left {staging.root}: run {command(facts.name, flag)} to resume it"
    found = found_sources(facts, location)
    if facts.kind == TORCHVISION:
        if found:
            return f"found {', '.join(str(p) for p in found.values())}: run {command(facts.name, flag)}"
        return download_hint(facts, location, flag)
    if found and len(found) == len(facts.sources):
        return f"found {', '.join(str(p) for p in found.values())}: run {command(facts.name, flag)}"
    lacking = [name for name in facts.sources if name not in found]
    return manual_hint(facts, location, flag, lacking)


def what_to_do(status: Status, flag: str) -> str:
    """What to do about a damaged dataset (one line)."""
    facts = CATALOG[status.name]
    again = f"run {command(facts.name, flag)}" if facts.kind == TORCHVISION else \
        f"lay it out again ({command(facts.name, flag)} does it from the downloaded files)"
    return f"{status.detail}. Move {status.where} away (or delete it), then {again}"


def render(statuses: list[Status], location: Path, flag: str) -> list[str]:
    shown = f"{location} ({location.resolve()})" if not location.is_absolute() else str(location)
    lines = [f"Datasets under {shown}{'' if location.is_dir() else ' (the folder does not exist)'}:"]
    lines += [HEADER] + [_row(status) for status in statuses]
    missing = [s for s in statuses if s.state == MISSING]
    damaged = [s for s in statuses if s.state == DAMAGED]
    notes = [s for s in statuses if s.state == PRESENT and s.detail and CATALOG[s.name].kind != GENERATED]
    if missing:
        lines += ["", "To get the missing ones:"]
        lines += [f"  {s.name}: {how_to_get(s, location, flag)}" for s in missing]
    if damaged:
        lines += ["", "Damaged:"]
        lines += [f"  {s.name}: {what_to_do(s, flag)}" for s in damaged]
    if notes:
        lines += ["", "Notes:"]
        lines += [f"  {s.name}: {s.detail}" for s in notes]
    real = [s for s in statuses if CATALOG[s.name].kind != GENERATED]
    counts = {state: sum(s.state == state for s in real) for state in (PRESENT, MISSING, DAMAGED)}
    eleven = [s for s in statuses if s.name in MTIL_ELEVEN]
    summary = f"{counts[PRESENT]} present, {counts[MISSING]} missing, {counts[DAMAGED]} damaged"
    generated = len(statuses) - len(real)
    if generated:
        summary += f" (and {generated} generated in memory)"
    if len(eleven) == len(MTIL_ELEVEN):
        ready = sum(s.state == PRESENT for s in eleven)
        summary += f"; {ready} of the eleven MTIL datasets present"
    lines += ["", summary + ". Where each comes from: docs/getting-data.md"]
    return lines
