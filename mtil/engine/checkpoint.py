"""Complete, atomic, weights-only checkpoints.

A checkpoint is a plain dict of tensors and Python values (no pickled objects): model and head state dicts,
optimiser, scheduler, method states, RNG states, counters and the resolved configuration. It is written to a
temporary file and renamed, with a checksum of every tensor, and read back verified (:mod:`mtil.tensor_files`,
``weights_only``): a file with bytes changed on disk is damage, like a truncated one.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from mtil.archive_check import archive_damage
from mtil.atomic import atomic_open
from mtil.engine.state import TrainingState
from mtil.errors import UserError
from mtil.flags import flags_with_role
from mtil.tensor_files import DamagedFile, load_tensors, save_tensors

FORMAT = "mtil-checkpoint"
VERSION = 1
LATEST = "latest.pth"
PREVIOUS = "latest.prev.pth"  # the latest checkpoint before the last one, kept until a newer one is verified

# Which flags are operational (may differ on resume), name a model, datasets or files is declared with each flag
# (mtil.flags roles); callers pass them as ``roles``, a parsed namespace's ``_roles``.
Roles = Mapping[str, Iterable[str]]  # role -> dests, as mtil.args.parse_args records in ``_roles``
FOLDER_PREFIX = "ImageFolder:"
RECORD_VERSION = 2  # of the configuration record inside checkpoints (see migrate_record)
DERIVED = ("record_version", "task_settings")  # record entries that are not flags


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


def _is_plain(value) -> bool:
    """True for what :func:`_plain` makes: str, numbers, None, and lists and str-keyed dicts of them."""
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return isinstance(value, (str, int, float, bool)) or value is None


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _expanded(text: str, key: str) -> Path:
    """``Path(text).expanduser()``; a UserError naming the flag for ``~name`` of no such user."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise UserError(f"--{key.replace('_', '-')} {text!r}: cannot expand {text.split('/')[0]!r} (no such user)"
                        ) from None


def _absolute(text: str, key: str) -> str:
    """``text`` as a resolved absolute path; a UserError naming the flag when it has none."""
    path = _expanded(text, key)
    try:
        return str(path.resolve())
    except (RuntimeError, ValueError) as exc:  # a symlink loop; a NUL character (from a --config file)
        raise UserError(f"--{key.replace('_', '-')} {text!r}: not a usable path ({exc})") from None


def _resolve_folder_names(value: Any, key: str) -> Any:
    """``ImageFolder:rel/path`` -> ``ImageFolder:/abs/path`` inside a dataset name or a list of them."""
    if isinstance(value, list):
        return [_resolve_folder_names(v, key) for v in value]
    if isinstance(value, str) and FOLDER_PREFIX in value:
        parts = []
        for part in value.split(","):
            if part.strip().startswith(FOLDER_PREFIX):
                part = FOLDER_PREFIX + _absolute(part.strip()[len(FOLDER_PREFIX):], key)
            parts.append(part)
        return ",".join(parts)
    return value


def normalize_paths(config: dict[str, Any], path_keys: Iterable[str] = (), *,
                    roles: Roles) -> dict[str, Any]:
    """Path-valued settings as resolved absolute paths, so a run typed with a relative path and resumed with an
    absolute one (or from another folder) is recognised as the same run. The flags of role ``path`` (and
    ``path_keys``) are paths; those of role ``model`` only when they name an existing file; ``ImageFolder:``
    entries of role ``dataset`` too."""
    out = dict(config)
    model_keys = flags_with_role(roles, "model")
    for key in set(path_keys) | flags_with_role(roles, "path") | model_keys:
        value = out.get(key)
        if not isinstance(value, str) or not value:
            continue
        if key in model_keys and not _expanded(value, key).is_file():
            continue  # a model name such as ViT-B/16
        out[key] = _absolute(value, key)
    for key in flags_with_role(roles, "dataset"):
        if key in out:
            out[key] = _resolve_folder_names(out[key], key)
    return out


def config_for_checkpoint(config: dict[str, Any], path_keys: Iterable[str] = (), *,
                          roles: Roles) -> dict[str, Any]:
    """The configuration as plain values (what weights_only loading accepts), paths resolved (see
    :func:`normalize_paths`); bookkeeping entries (names starting with '_') left out."""
    plain = {k: _plain(v) for k, v in config.items() if not k.startswith("_")}
    return normalize_paths(plain, path_keys, roles=roles)


def migrate_record(saved: dict[str, Any]) -> dict[str, Any]:
    """A configuration record of an older mtil in today's terms, so that an old run resumes.

    Version 1 (before 2026-11-24) stored ``image_loss`` / ``text_loss`` resolved (both true when neither flag was
    given: today both false mean the same), had no ``lwf_sentences`` (LwF then used every template), no
    ``precision`` (training ran in fp32) and no ``task_settings``.
    """
    if saved.get("record_version", 1) >= RECORD_VERSION:
        return saved
    out = dict(saved)
    if out.get("image_loss") and out.get("text_loss"):
        out["image_loss"] = out["text_loss"] = False
    out.setdefault("lwf_sentences", "all-templates")
    if out.get("precision") in (None, "auto"):  # training before version 2 ran in fp32 whatever was recorded
        out["precision"] = "fp32"
    out["record_version"] = RECORD_VERSION
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None,
                       path_keys: Iterable[str] = (), ignore: Iterable[str] = (), *,
                       roles: Roles) -> list[tuple[str, Any, Any]]:
    """(setting, saved value, current value) for every setting that really differs. Paths compare as resolved
    files (``roles``: see :func:`normalize_paths`); a flag newer than the checkpoint counts only when it is not at
    its default; a flag that no longer exists, a flag in ``ignore`` (read by no active method or component) and
    the flags of role ``operational`` (they change how a run executes, not what it computes) never count.
    ``task_settings`` (what each task trains with) compares when both records have it: it catches an edited
    sequence file, or a typed value that replaced a named order's."""
    defaults = {k: _plain(v) for k, v in (defaults or {}).items()}
    saved = normalize_paths(migrate_record(saved), path_keys, roles=roles)
    current = normalize_paths(current, path_keys, roles=roles)
    operational = flags_with_role(roles, "operational")
    differences = []
    for key in sorted(set(current) - operational - set(ignore) - {"record_version"}):
        if key == "task_settings" and key not in saved:
            continue
        if key not in saved:
            if key in defaults and current.get(key) != defaults[key]:
                differences.append((key, defaults[key], current.get(key)))
        elif saved.get(key) != current.get(key):
            differences.append((key, saved.get(key), current.get(key)))
    from mtil.engine.run import TASK_SETTINGS

    if any(k in TASK_SETTINGS for k, _, _ in differences):  # a differing flag already explains the tasks' values
        differences = [d for d in differences if d[0] != "task_settings"]
    return differences


def _difference(key: str, saved: Any, now: Any) -> str:
    if key != "task_settings":
        return f"--{key.replace('_', '-')} {saved} -> {now}"
    changed = []
    for before, after in zip(saved or [], now or []):
        changed += [f"{after.get('dataset')} {k} {before.get(k)} -> {after.get(k)}" for k in after
                    if k != "dataset" and before.get(k) != after.get(k)]
    if len(saved or []) != len(now or []) or not changed:
        return "the tasks' settings (sequence file or named order)"
    return "per-task " + ", ".join(changed[:4])


def describe_differences(differences: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """``--lr 1e-05 -> 0.0001, --method lwf -> ZSCL`` (saved -> now)."""
    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, list) else value

    items = [_difference(k, a, b) if k == "task_settings" else _difference(k, shown(a), shown(b))
             for k, a, b in differences[:limit]]
    more = len(differences) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def save_checkpoint(path: str | Path, payload: dict[str, Any], keep_previous: bool = False) -> Path:
    """Write ``payload`` atomically. ``keep_previous``: the file it replaces becomes ``latest.prev.pth`` (a hard
    link staged before the new file is written and renamed into place once it is, so a good file exists at every
    instant and a failed write, a full disk say, changes neither), and the new file is read back (every zip
    record's CRC, :func:`mtil.archive_check.archive_damage`) before the call returns."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    staged = _stage_previous(path) if keep_previous and path.is_file() else None
    try:
        with atomic_open(path, "wb") as handle:
            save_tensors(payload, handle)
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    if staged is not None:
        os.replace(staged, path.parent / PREVIOUS)
    if keep_previous:
        damaged = archive_damage(path)
        if damaged:
            raise UserError(f"{path} did not read back as written ({damaged}); {path.parent / PREVIOUS} is the last "
                            f"good checkpoint (is the disk failing?)")
    return path


def _stage_previous(path: Path) -> Path:
    """A second name for ``path``'s current file, made before ``path`` is replaced (a copy where the file
    system has no hard links)."""
    staged = path.parent / f".{PREVIOUS}.link.tmp"
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:
        shutil.copyfile(path, staged)
    return staged


def remove_orphaned_temporaries(folder: Path) -> list[str]:
    """Delete the ``.<name>.XXXX.tmp`` files that a kill during an atomic write leaves behind (they are never
    read: the rename is the commit). Returns their names."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return sorted(removed)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``, verified (a UserError naming the file and the damage when it is not intact)."""
    path = Path(path)
    try:
        payload = load_tensors(path, "checkpoint")
    except DamagedFile as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {path} ({exc.strerror or exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not an mtil checkpoint")
    return payload


def _valid_record(config: Any) -> bool:
    """A configuration record as :func:`config_for_checkpoint` writes it (plain values; its derived entries of
    their types), so that comparing it with this command's cannot fail."""
    settings = config.get("task_settings") if isinstance(config, dict) else None
    return (isinstance(config, dict) and _is_plain(config)
            and isinstance(config.get("record_version", 1), (int, float))
            and isinstance(settings or [], list) and all(isinstance(t, dict) for t in settings or []))


RESUME_KEYS = ("arch", "model", "state", "config")
MID_TASK_KEYS = ("optimizer", "scheduler", "rng")


def load_resumable(path: str | Path) -> dict[str, Any]:
    """A checkpoint a run can resume from: readable, and holding everything resuming reads (one-line error
    naming the file and the missing entry otherwise, never a KeyError)."""
    payload = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in payload]
    if "optimizer" in payload:
        missing += [k for k in MID_TASK_KEYS if k not in payload]
    if not missing:
        try:
            TrainingState.from_dict(payload["state"])
        except TypeError as exc:  # not a dict, or entries TrainingState does not have
            missing = [f"a valid state ({str(exc)[:60]})"]
        if not _valid_record(payload["config"]):
            missing.append("a valid config")
    if missing:
        raise UserError(f"cannot resume from {path}: it lacks {', '.join(missing)} (damaged or not written by mtil)")
    from mtil.models.clip_loading import weights_record
    from mtil.models.heads import head_from_state

    if not isinstance(payload["arch"], dict):  # None would read as "no record" below
        raise UserError(f"cannot resume from {path}: its recorded architecture is {type(payload['arch']).__name__}, "
                        f"not a dict (damaged or not written by mtil)")
    try:  # the weights are tensors of the recorded architecture (a damaged record never builds a giant model)
        weights_record(payload["model"], payload["arch"], "its weights")
    except UserError as exc:
        raise UserError(f"cannot resume from {path}: {exc}") from None
    heads = payload.get("heads")
    entries = [] if heads is None else heads.values() if isinstance(heads, dict) else [heads]
    try:  # the heads learned so far (small: read them now rather than after the run's folder is written to)
        for entry in entries:
            head_from_state(entry)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot resume from {path}: a learned head cannot be read ({str(exc)[:80]})") from None
    return payload
