"""Getting one dataset into the data folder: planned (every refusal known before anything is written), then done.

* torchvision's sets: the registry's opener with ``download=True`` (the code path of ``python -m mtil.main
  --download``) in the work folder, so torchvision downloads, checks and extracts; an archive the user downloaded
  (at torchvision's place or at the top of the data folder) is used instead of the network.
* ImageNet: ``torchvision.datasets.ImageNet`` lays out the three archives from image-net.org.
* Stanford Cars: the four original files, extracted with torchvision's ``extract_archive``.
* Conceptual Captions: the official validation TSV (caption, image URL) becomes the tab-separated file with a
  ``title`` column that mtil reads; only the captions are used, so dead image links do not matter.

Each is verified with :func:`mtil.data.check.check` in the work folder (:mod:`mtil.data.staging`) and moved into
place only once it passes, so a prepare cut short is resumed by running it again.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from mtil.data.catalog import CAPTIONS, CARS, CC_OUTPUT, GENERATED, IMAGENET, TORCHVISION, DatasetFacts
from mtil.data.check import DAMAGED, PRESENT, Status, check
from mtil.data.sources import found_sources
from mtil.data.staging import Staging
from mtil.errors import UserError

NOTHING, DONE, RUN = "nothing", "done", "run"


class PrepareError(UserError):
    """One dataset could not be prepared: one line naming it, what failed and what to do."""


@dataclass
class Plan:
    facts: DatasetFacts
    action: str  # NOTHING (generated), DONE (already present), RUN
    sources: dict[str, Path] = field(default_factory=dict)  # the user's downloaded files found
    status: Status | None = None


def command(name: str, flag: str) -> str:
    return f"python -m mtil.data prepare {name}{flag}"


def plan(facts: DatasetFacts, location: Path, flag: str = "") -> Plan:
    """What ``prepare`` will do for ``facts``; a PrepareError when it cannot (checked before anything is
    written): damaged data in the way, or files only the user can download not there yet."""
    if facts.kind == GENERATED:
        return Plan(facts, NOTHING)
    status = check(facts.name, location)
    if status.state == PRESENT:
        return Plan(facts, DONE, status=status)
    if status.state == DAMAGED:
        raise PrepareError(f"{facts.name}: {status.where} is damaged ({status.detail}): move it away (or delete "
                           f"it) and run {command(facts.name, flag)} again")
    sources = found_sources(facts, location)
    staging = Staging(location, facts)
    if facts.kind in (IMAGENET, CARS, CAPTIONS):
        staged = {Path(relative).name for relative in staging.moved()}
        lacking = [name for name in facts.sources if name not in sources and name not in staged]
        if lacking:
            raise PrepareError(f"{facts.name}: {manual_hint(facts, location, flag, lacking)}")
    return Plan(facts, RUN, sources, status)


def manual_hint(facts: DatasetFacts, location: Path, flag: str, lacking: list[str] | None = None) -> str:
    """How to get a dataset torchvision cannot download (one line)."""
    lacking = list(facts.sources) if lacking is None else lacking
    where = f"{location}/ (or {location / facts.folder}/)"
    files = ", ".join(lacking)
    if facts.kind == IMAGENET:
        return (f"cannot be downloaded automatically (it needs a free account at {facts.page}): put {files} in "
                f"{where} and run {command(facts.name, flag)}, or place the images under {location}/ as {facts.layout}")
    if facts.kind == CARS:
        return (f"cannot be downloaded automatically: {facts.note} ({facts.page}); put {files} in {where} and "
                f"run {command(facts.name, flag)}, or place the files under {location}/ as {facts.layout}")
    return (f"download {files} from {facts.page} into {where} and run "
            f"{command(facts.name, flag)}; only the captions are used (dead image links do not matter); "
            f"--ref-sentences random, ref or dataset:NAMES need no Conceptual Captions")


def download_hint(facts: DatasetFacts, location: Path, flag: str) -> str:
    """How a torchvision set is fetched, and where to put its archive when the download fails (one line)."""
    names = ", ".join(Path(a.path).name for a in facts.archives)
    note = f"; {facts.note}" if facts.note else ""
    return (f"{command(facts.name, flag)} (torchvision downloads {names}, about {facts.size}, from "
            f"{facts.page}{note}); if the download fails, put {names} in {location}/ and run it again")


# --------------------------------------------------------------------------------------------- doing it
def run(plan: Plan, location: Path, flag: str = "", say=print) -> Status:
    """Prepare one planned dataset; its final status (present), or a PrepareError. KeyboardInterrupt passes
    through, leaving the work folder for the next run."""
    facts = plan.facts
    staging = Staging(location, facts)
    if plan.action != RUN:
        if staging.exists():  # a prepare stopped after moving the dataset into place: finish its clean-up
            staging.restore()
            staging.remove()
        return plan.status or Status(facts.name, PRESENT, detail="generated in memory")
    if not staging.verified():
        try:
            _fill(plan, staging, flag, say)
        except (UserError, KeyboardInterrupt):
            staging.restore()
            raise
        except Exception as exc:
            staging.restore()
            raise PrepareError(_failure(facts, location, flag, exc)) from None
        status = check(facts.name, staging.root)
        if status.state != PRESENT:
            staging.restore()
            raise PrepareError(f"{facts.name}: the prepared files fail the checks ({status.detail}); they are "
                               f"left in {staging.root}: delete that folder and run "
                               f"{command(facts.name, flag)} again")
        staging.mark_verified()
    staging.install()
    staging.restore()
    staging.remove()
    status = check(facts.name, location)
    if status.state != PRESENT:  # cannot happen unless something changed the files meanwhile
        raise PrepareError(f"{facts.name}: moved into {status.where} but it fails the checks: {status.detail}")
    return status


def _failure(facts: DatasetFacts, location: Path, flag: str, exc: BaseException) -> str:
    detail = " ".join(str(exc).split())[:300]
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if facts.kind == TORCHVISION:
        return f"{facts.name}: the download or extraction failed ({detail}); {download_hint(facts, location, flag)}"
    return f"{facts.name}: laying out the downloaded files failed ({detail}); {manual_hint(facts, location, flag)}"


def _fill(plan: Plan, staging: Staging, flag: str, say) -> None:
    facts = plan.facts
    if facts.kind == TORCHVISION:
        _torchvision(plan, staging, say)
    elif facts.kind == IMAGENET:
        _imagenet(plan, staging, say)
    elif facts.kind == CARS:
        _stanford_cars(plan, staging, say)
    elif facts.kind == CAPTIONS:
        _captions(plan, staging, say)


def _torchvision(plan: Plan, staging: Staging, say) -> None:
    facts = plan.facts
    kept = staging.start(keep=tuple(a.path for a in facts.archives),
                         unchecked=tuple(a.path for a in facts.archives if not a.checked))
    for relative, path in plan.sources.items():
        if relative not in kept:
            say(f"{facts.name}: using {path}")
            staging.bring(path, relative)
    if kept:
        say(f"{facts.name}: resuming in {staging.root} (keeping {', '.join(kept)})")
    say(f"{facts.name}: torchvision fetches and extracts it in {staging.root}")
    from mtil.datasets.registry import find_entry

    data = find_entry(facts.name).open(staging.root, True)  # as python -m mtil.main --download opens it
    for split in ("train", "test"):
        data.raw(split)


def _bring_sources(plan: Plan, staging: Staging, say) -> dict[str, Path]:
    """The user's files moved into ``<work folder>/<folder>/``: name -> staged path."""
    facts = plan.facts
    staging.start()
    staged = {}
    for name in facts.sources:
        relative = f"{facts.folder}/{name}"
        if not (staging.root / relative).is_file():
            say(f"{facts.name}: using {plan.sources[name]}")
            staging.bring(plan.sources[name], relative)
        staged[name] = staging.root / relative
    return staged


def _imagenet(plan: Plan, staging: Staging, say) -> None:
    _bring_sources(plan, staging, say)
    say(f"{plan.facts.name}: torchvision lays out the archives in {staging.root} (this takes a while)")
    from torchvision.datasets import ImageNet

    for split in ("train", "val"):
        ImageNet(str(staging.root / plan.facts.folder), split=split)


def _stanford_cars(plan: Plan, staging: Staging, say) -> None:
    from torchvision.datasets.utils import extract_archive

    staging.start()
    target = staging.root / plan.facts.folder
    target.mkdir(parents=True, exist_ok=True)
    for name, path in plan.sources.items():
        if name.endswith(".mat"):
            (target / name).write_bytes(path.read_bytes())
        else:
            say(f"{plan.facts.name}: extracting {path}")
            extract_archive(str(path), str(target))


def _captions(plan: Plan, staging: Staging, say) -> None:
    staging.start()
    source = plan.sources[plan.facts.sources[0]]
    say(f"{plan.facts.name}: reading the captions of {source}")
    captions = read_caption_tsv(source)
    target = staging.root / plan.facts.folder / CC_OUTPUT
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["title", "filepath"])
        writer.writerows(captions)


def read_caption_tsv(path: Path) -> list[tuple[str, str]]:
    """(caption, image URL) rows of Conceptual Captions' official TSV (no header; a header row is skipped)."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for line_number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row or not row[0].strip():
                    continue
                if line_number == 1 and row[0].strip().lower() in ("caption", "title"):
                    continue
                rows.append((" ".join(row[0].split()), row[1].strip() if len(row) > 1 else ""))
    except UnicodeDecodeError as exc:
        raise PrepareError(f"ConceptualCaptions: {path} is not UTF-8 text (byte {exc.start})") from None
    if not rows:
        raise PrepareError(f"ConceptualCaptions: {path} holds no captions (expected lines 'caption<TAB>url')")
    return rows
