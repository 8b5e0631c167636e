"""Build or load a CLIP model: OpenAI names (through clip-anytorch), local files, tiny test architectures, and
open_clip's models (``open_clip:ARCH[/PRETRAINED]``, :mod:`mtil.models.open_clip_backend`).

Everything ends as a float32 model on the requested device (a ``clip.model.CLIP``, or open_clip's), plus its
record (an :class:`Architecture` or an ``OpenClipSpec``: what a checkpoint saves as ``"arch"`` to rebuild it) and
a note of where it came from.
Weights files are read with ``weights_only=True`` (no arbitrary code); OpenAI's TorchScript archives are read as
data by ``torchscript_weights`` (``torch.jit.load`` would run the archive's code, so mtil never calls it).
"""
from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from clip import clip as clip_api
from clip.model import CLIP

from mtil.hardware import resolve_device  # noqa: F401 - re-exported: callers load a model on a device
from mtil.errors import UserError
from mtil.flags import did_you_mean
from mtil.finite import first_nonfinite
from mtil.models import toyclip
from mtil.models.open_clip_backend import build_open_clip, is_open_clip_name
from mtil.models.torchscript_weights import NotTorchScript, is_torchscript_archive, read_torchscript_tensors
from mtil.tensor_files import DamagedFile, payload_tensors, read_tensor_file
from mtil.models.architectures import (
    ALL_ARCHITECTURES,
    OPENAI_ARCHITECTURES,
    Architecture,
    architecture_from_state_dict,
)

DOWNLOAD_TIMEOUT_S = 20


ModelRecord = Any  # an Architecture (clip-anytorch) or an open_clip_backend.OpenClipSpec; both have to_dict()


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: ModelRecord
    source: str
    checkpoint: dict[str, Any] = field(default_factory=dict)  # the rest of an mtil checkpoint, if one was loaded


def build_clip(arch: Architecture, seed: int | None = None) -> CLIP:
    """A float32 CLIP with freshly initialised (random) weights."""
    if seed is not None:
        torch.manual_seed(seed)
    return CLIP(**asdict(arch)).float()


def model_names() -> list[str]:
    return [*ALL_ARCHITECTURES, toyclip.TOYCLIP]


def weights_file_for(name: str, clip_root: str | os.PathLike) -> Path:
    """Where the OpenAI weights of ``name`` live under ``clip_root`` (clip-anytorch's file name)."""
    return Path(clip_root) / os.path.basename(clip_api._MODELS[name])


def _download_openai(name: str, clip_root: Path) -> Path:
    target = weights_file_for(name, clip_root)
    if target.is_file():
        return target
    url = clip_api._MODELS[name]
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return Path(clip_api._download(url, str(clip_root)))
    except Exception as exc:  # no network, proxy refusal, checksum failure ...
        if target.exists() and target.stat().st_size == 0:
            target.unlink()
        raise UserError(
            f"CLIP weights for {name} are missing: looked for {target} (--clip-root {clip_root}); "
            f"the download failed ({type(exc).__name__}: {str(exc)[:80]}). "
            f"Fetch {url} on a machine with internet and place it at {target}"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Strip DataParallel/DDP ``module.`` prefixes and non-parameter entries kept by OpenAI files."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key in ("input_resolution", "context_length", "vocab_size"):
            continue
        out[key] = value
    return out


# What a --load reads of an mtil checkpoint besides the weights (the task history, the learned heads, the step), by
# the type it must have when present.
CHECKPOINT_ENTRIES = {"state": dict, "config": dict, "heads": dict, "iteration": int}
STATE_ENTRIES = {"completed": list, "global_step": int, "base": dict}


def _odd_entry(rest: Mapping[str, Any]) -> str | None:
    """``'name' is <type>`` for the first entry of ``CHECKPOINT_ENTRIES`` (or of its state) of another type."""
    state = rest.get("state") if isinstance(rest.get("state"), dict) else {}
    for prefix, entries, holder in (("", CHECKPOINT_ENTRIES, rest), ("state.", STATE_ENTRIES, state)):
        for key, kind in entries.items():
            if key in holder and not isinstance(holder[key], kind):
                return f"'{prefix}{key}' is {type(holder[key]).__name__}, not {kind.__name__}"
    return None


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read any supported weights file: returns (CLIP state dict, the rest of an mtil checkpoint or {})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if is_torchscript_archive(path):  # OpenAI's released files: their tensors, read as data
        try:
            payload = read_torchscript_tensors(path)
        except NotTorchScript as exc:
            raise UserError(f"cannot read {path} as a TorchScript archive's weights: {exc}") from None
    else:  # torch.save's format: its checksums (an mtil file) or its zip CRCs verified
        try:
            payload = read_tensor_file(path, "weights file")
        except DamagedFile:
            raise
        except UserError:
            raise UserError(
                f"cannot read {path}: not an mtil checkpoint, an OpenAI CLIP file or a ZSCL state dict"
            ) from None
    if not isinstance(payload, Mapping):
        raise UserError(f"cannot read {path}: expected a dict of weights, found {type(payload).__name__}")
    if payload.get("format") == "mtil-checkpoint":
        if not isinstance(payload.get("model"), Mapping):
            raise UserError(f"cannot read {path}: an mtil checkpoint without its model weights (damaged?)")
        rest = {k: v for k, v in payload.items() if k != "model"}
        odd = _odd_entry(rest)
        if odd:
            raise UserError(f"cannot read {path}: its entry {odd} (damaged?)")
        _check_finite(path, payload_tensors({"model": payload["model"], "heads": rest.get("heads")}))
        return _clean_state_dict(payload["model"]), rest
    if "state_dict" in payload and isinstance(payload["state_dict"], Mapping):  # original ZSCL format
        payload = payload["state_dict"]
    state_dict = _clean_state_dict(payload)
    if "text_projection" not in state_dict:
        raise UserError(f"{path} holds no CLIP weights (no 'text_projection' key among {len(state_dict)} entries)")
    _check_finite(path, state_dict.items())
    return state_dict, {}


def _check_finite(path: Path, named) -> None:
    """Weights from a file are used only when every one is finite (NaN, inf or exploded values would train or
    evaluate to chance without a word)."""
    bad = first_nonfinite((name, value) for name, value in named if isinstance(value, torch.Tensor))
    if bad is not None:
        raise UserError(f"cannot use {path}: weight {bad}; the file holds no usable model")


def _same(recorded: Any, value: Any) -> bool:
    """``recorded == value`` for plain values, never comparing a tensor (a damaged record may hold one)."""
    if isinstance(value, list):
        return (isinstance(recorded, (list, tuple)) and len(recorded) == len(value)
                and all(_same(r, v) for r, v in zip(recorded, value)))
    return type(recorded) is type(value) and recorded == value


def weights_architecture(state_dict: Any, recorded: Any = None, source: str = "weights") -> Architecture:
    """The architecture of a CLIP state dict, from its shapes; an mtil checkpoint's recorded ``arch`` must be that
    one. A one-line UserError naming ``source`` when an entry is not a tensor, an entry is missing, or the record
    is damaged (so that a flipped size never builds a giant model)."""
    if not isinstance(state_dict, Mapping):
        raise UserError(f"{source} are not a dict of tensors but {type(state_dict).__name__}")
    odd = next((k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise UserError(f"{source}: entry {odd!r} is {type(state_dict[odd]).__name__}, not a tensor (damaged?)")
    try:
        arch = architecture_from_state_dict(state_dict)
    except KeyError as exc:
        raise UserError(f"{source} are not a complete CLIP state dict (no {exc.args[0]!r})") from None
    except (IndexError, TypeError):  # an entry of the wrong rank or size
        raise UserError(f"{source} are not a CLIP state dict (an entry has the wrong shape)") from None
    if recorded is not None:
        shapes = arch.to_dict()
        wrong = [k for k, v in shapes.items() if not isinstance(recorded, Mapping) or not _same(recorded.get(k), v)]
        if wrong:
            shown = recorded.get(wrong[0]) if isinstance(recorded, Mapping) else recorded
            raise UserError(f"{source}: the recorded architecture does not match the weights ({wrong[0]} "
                            f"{shown!r:.40}, the weights' shapes give {shapes[wrong[0]]}); the file is damaged")
    return arch


def model_from_state_dict(state_dict: dict[str, torch.Tensor], arch: Architecture | None = None) -> CLIP:
    arch = arch or weights_architecture(state_dict)
    try:
        model = build_clip(arch)
    except (ValueError, TypeError, ZeroDivisionError) as exc:  # shapes no CLIP has, e.g. a width of 0
        raise UserError(f"weights do not describe a CLIP mtil can build ({type(exc).__name__}: {str(exc)[:80]})"
                        ) from None
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:120])
        raise UserError(f"weights do not fit the CLIP architecture: {first}") from None
    if missing or unexpected:
        raise UserError(
            f"weights do not fit the CLIP architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model


STRUCTURE = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
             "transformer_width", "transformer_layers")


def check_model_matches(name: str, arch: ModelRecord, load: str) -> None:
    """A ``--model`` typed beside ``--load`` must name the loaded architecture (the file's decides the model, so a
    different name would be ignored silently)."""
    from mtil.models.open_clip_backend import parse_name

    held = None if isinstance(arch, Architecture) else f"open_clip:{arch.arch}"
    if is_open_clip_name(name) or (held and name in ALL_ARCHITECTURES):
        if held is None or not is_open_clip_name(name) or parse_name(name)[0] != arch.arch:
            raise UserError(f"--load {load} holds a{'n' if held else ''} {held or 'clip-anytorch'} model, not "
                            f"--model {name}: drop --model (the file decides the architecture) or load another file")
        return
    if name in ALL_ARCHITECTURES:
        expected = ALL_ARCHITECTURES[name]
        if any(getattr(expected, f) != getattr(arch, f) for f in STRUCTURE):
            matches = [n for n, a in ALL_ARCHITECTURES.items() if all(getattr(a, f) == getattr(arch, f)
                                                                      for f in STRUCTURE)]
            raise UserError(f"--load {load} holds a {matches[0] if matches else 'different'} model, not --model "
                            f"{name}: drop --model (the file decides the architecture) or load another file")


def is_open_clip_record(recorded: Any) -> bool:
    return isinstance(recorded, Mapping) and "backend" in recorded and recorded.get("backend") != "clip"


def record_from_dict(recorded: Mapping[str, Any]) -> ModelRecord:
    """The model record a checkpoint saved as ``"arch"`` (records without ``backend`` are clip-anytorch's)."""
    if is_open_clip_record(recorded):
        from mtil.models.open_clip_backend import OpenClipSpec

        return OpenClipSpec.from_dict(recorded)
    return Architecture.from_dict(recorded)


def build_model(record: ModelRecord) -> torch.nn.Module:
    """A model of ``record`` with fresh weights (also on the meta device: the structure without memory)."""
    if isinstance(record, Architecture):
        return build_clip(record)
    from mtil.models.open_clip_backend import build_from_spec

    return build_from_spec(record)


def model_from_record(state_dict: dict[str, torch.Tensor], record: ModelRecord) -> torch.nn.Module:
    """The model ``record`` describes, holding ``state_dict``."""
    if isinstance(record, Architecture):
        return model_from_state_dict(state_dict, record)
    from mtil.models.open_clip_backend import model_from_spec

    return model_from_spec(record.to_dict(), state_dict)


def weights_record(state_dict: Any, recorded: Any = None, source: str = "weights") -> ModelRecord:
    """:func:`weights_architecture` for either back-end: an open_clip record is checked against the weights when
    the model is built from it."""
    if is_open_clip_record(recorded):
        from mtil.models.open_clip_backend import check_weights

        return check_weights(recorded, state_dict, source)
    return weights_architecture(state_dict, recorded, source)


def load_clip(
    name: str,
    *,
    clip_root: str | os.PathLike = "clip",
    untrained: bool = False,
    load: str | None = None,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    name_given: bool = False,
) -> LoadedModel:
    """Resolve ``--model`` / ``--untrained`` / ``--load`` into a model.

    ``--load`` wins over the model's own weights (its architecture comes from the file; a ``--model`` the user
    gave too, ``name_given``, must name that architecture); ``--untrained`` gives random weights of the named
    architecture; a tiny architecture without ``--load`` is random too.
    """
    checkpoint: dict[str, Any] = {}
    if load:
        state_dict, checkpoint = read_weights_file(load)
        arch = weights_record(state_dict, checkpoint.get("arch"), f"--load {load}")
        if name_given:
            check_model_matches(name, arch, load)
        model = model_from_record(state_dict, arch)
        loaded = LoadedModel(model, arch, f"file {load}", checkpoint)
    elif is_open_clip_name(name):
        model, spec = build_open_clip(name, clip_root=clip_root, untrained=untrained, seed=seed)
        weights = f"weights {spec.pretrained}" if spec.pretrained else "random weights"
        loaded = LoadedModel(model, spec, f"open_clip {spec.arch} with {weights}")
    elif name == toyclip.TOYCLIP and not untrained:
        state_dict, arch = toyclip.read_asset()
        loaded = LoadedModel(model_from_state_dict(state_dict, arch), arch, f"{name} (the built-in pre-trained "
                             f"tiny CLIP, {toyclip.ASSET.name})")
    elif name == toyclip.TOYCLIP:  # --untrained: its architecture with random weights
        arch = toyclip.read_asset()[1]
        loaded = LoadedModel(build_clip(arch, seed), arch, f"{name} with random weights")
    elif name in ALL_ARCHITECTURES and (untrained or name not in OPENAI_ARCHITECTURES):
        arch = ALL_ARCHITECTURES[name]
        loaded = LoadedModel(build_clip(arch, seed), arch, f"{name} with random weights")
    elif name in OPENAI_ARCHITECTURES:
        path = _download_openai(name, Path(clip_root))
        state_dict, _ = read_weights_file(path)
        model = model_from_state_dict(state_dict)
        loaded = LoadedModel(model, architecture_from_state_dict(state_dict), f"OpenAI {name} from {path}")
    elif Path(name).is_file():
        state_dict, checkpoint = read_weights_file(name)
        arch = weights_record(state_dict, checkpoint.get("arch"), f"--model {name}")
        loaded = LoadedModel(model_from_record(state_dict, arch), arch, f"file {name}", checkpoint)
    else:
        raise UserError(f"unknown --model {name!r}{did_you_mean(name, model_names())}; valid names: "
                        f"{', '.join(model_names())}, open_clip:ARCH[/PRETRAINED] (e.g. open_clip:mtil-tiny-vit), "
                        f"or a path to a weights file")
    loaded.model.to(device)
    return loaded
