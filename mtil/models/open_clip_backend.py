"""open_clip models for mtil: ``--model open_clip:ARCH[/PRETRAINED]``, built and loaded offline.

Names. ``open_clip:ViT-B-16/laion2b_s34b_b88k`` is open_clip's architecture ``ViT-B-16`` with its pretrained tag
``laion2b_s34b_b88k``; ``open_clip:mtil-tiny-vit`` and ``open_clip:mtil-tiny-siglip`` are mtil's own tiny
configurations (``mtil/assets/open_clip/*.json``, random weights, for tests and benchmarks), and
``open_clip:mtil-tiny-vit/toyclip`` is that configuration holding the built-in pre-trained ``toyclip`` weights (the
same architecture and parameter names: the same model through either back-end). PRETRAINED may also be
a weights file: ``open_clip:ViT-B-16//abs/path/w.safetensors`` or ``open_clip:ViT-B-16/w.safetensors``.

Weights are looked up without the network (open_clip's ``create_model`` would download them, so mtil never calls
it: it builds the model class from the configuration and loads the weights itself), in this order:

1. ``<clip_root>/open_clip/<hf repo id>/<file>``, ``<file>`` being ``open_clip_model.safetensors`` then the tag's
   own file name (``open_clip_pytorch_model.bin`` by default): what
   ``hf download <repo id> open_clip_model.safetensors --local-dir <clip_root>/open_clip/<repo id>`` writes;
2. ``<clip_root>/<file name of the tag's URL>`` for tags with a URL (e.g. OpenAI's ``ViT-B-16.pt``, the very file
   clip-anytorch keeps under ``--clip-root``; its TorchScript archive is read as data);
3. the Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read
   when looked up), the same files of the same repo id.

Weights are data: safetensors, or ``torch.load(weights_only=True)`` through :mod:`mtil.tensor_files`, never code.

Facts about open_clip's models the rest of mtil relies on (open-clip-torch 3.3.0):

* open_clip's native ``CLIP`` (ViT or ModifiedResNet image tower, native text tower) has exactly OpenAI's
  parameter names and shapes: ``visual.conv1``, ``visual.class_embedding``, ``visual.positional_embedding``,
  ``visual.ln_pre``, ``visual.transformer.resblocks.N.{ln_1,attn.in_proj_weight,attn.in_proj_bias,attn.out_proj,
  ln_2,mlp.c_fc,mlp.c_proj}``, ``visual.ln_post``, ``visual.proj``, ``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``, ``logit_scale`` (``mtil-tiny-vit`` takes
  clip-anytorch's ``tiny-vit`` state dict as it is and gives identical outputs). Additions: ``logit_bias``
  (SigLIP-style models), ``ls_1``/``ls_2`` (layer scale, when configured), ``attn_mask`` (a non-persistent buffer on
  the model). Differences of attributes: ``visual.image_size`` (a tuple) instead of ``visual.input_resolution``; no
  ``model.dtype``.
* Its ``nn.MultiheadAttention`` is ``batch_first=True``: block inputs and outputs are (N, L, D), OpenAI's (L, N, D).
* ``CustomTextCLIP`` (SigLIP, most timm towers) keeps the text tower under ``text.``: ``text.token_embedding``,
  ``text.transformer.resblocks.N.*``, ``text.ln_final``, ``text.text_projection`` (an ``nn.Linear`` when
  ``proj_bias``: weight (E, W), transposed against OpenAI's (W, E) parameter).
* SigLIP's text tower pools the LAST position (``pool_type='last'``) without a causal mask, so the padding is part
  of the sentence's feature: its tokens must keep the context length (``pads_freely`` is False).
* timm image towers (``visual.trunk``) use timm's own ``Attention`` (fused ``attn.qkv`` and ``attn.proj``
  Linear layers, ``norm1``/``norm2``, ``mlp.fc1``/``mlp.fc2``), not ``nn.MultiheadAttention``; their blocks are
  ``visual.trunk.blocks``.
* ``model(image, text)`` returns normalised features, ``logit_scale.exp()`` and, for SigLIP, ``logit_bias`` (not
  logits); ``model.get_logits`` gives ``exp(scale) * f @ t.T (+ bias)``.
* open_clip's native ``encode_text`` needs tokens of the full context length (it adds the whole positional
  embedding and mask): :func:`encode_text` here accepts shorter (trimmed) tokens.
* ``import open_clip`` takes seconds (it imports timm and transformers): this module imports it only when needed.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtil.errors import UserError
from mtil.flags import did_you_mean

PREFIX = "open_clip:"
BACKEND = "open_clip"
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "open_clip"
TINY_NAMES = ("mtil-tiny-vit", "mtil-tiny-siglip")
TOYCLIP_TAG = ("mtil-tiny-vit", "toyclip")  # toyclip's weights (clip-anytorch tiny-vit) in open_clip's model

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Image preprocessing of mtil's tiny configurations (open_clip keeps it with the pretrained tag, which they lack).
_TINY_PREPROCESS = {
    "mtil-tiny-vit": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"},
    "mtil-tiny-siglip": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                         "resize_mode": "squash"},
}
_DEFAULT_PREPROCESS = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                       "resize_mode": "shortest"}
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_SAFE_WEIGHTS = "open_clip_model.safetensors"
_WEIGHTS = "open_clip_pytorch_model.bin"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def is_open_clip_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


@functools.lru_cache(maxsize=None)
def _open_clip():
    """open_clip, imported on first use, with mtil's tiny configurations registered."""
    import open_clip
    from open_clip import factory

    if ASSETS not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(ASSETS)
    return open_clip


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.lower().endswith(_WEIGHT_SUFFIXES)


def parse_name(name: str) -> tuple[str, str | None]:
    """``open_clip:ARCH[/PRETRAINED]`` -> (ARCH, PRETRAINED or None); PRETRAINED a known tag (normalised as open_clip
    writes it) or a weights file path. One-line UserError with a did-you-mean for an unknown ARCH or tag."""
    if not is_open_clip_name(name):
        raise UserError(f"{name!r} is not an open_clip model name (expected {PREFIX}ARCH[/PRETRAINED])")
    rest = name[len(PREFIX):]
    arch, slash, tag = rest.partition("/")
    oc = _open_clip()
    models = oc.list_models()
    if arch not in models:
        if f"{arch}-{tag}" in models:  # OpenAI's spelling, ViT-B/16
            hint = f" (did you mean {PREFIX}{arch}-{tag}?)"
        else:
            hint = did_you_mean(arch, models) or f" (e.g. {PREFIX}ViT-B-16/laion2b_s34b_b88k or {PREFIX}mtil-tiny-vit)"
        raise UserError(f"unknown open_clip architecture {arch!r} in --model {name}{hint}")
    if not slash:
        return arch, None
    if not tag:
        raise UserError(f"--model {name}: nothing after '/'; give a pretrained tag or drop the '/'")
    if (arch, tag) == TOYCLIP_TAG:
        return arch, tag
    tags = oc.list_pretrained_tags_by_model(arch)
    if oc.pretrained.is_pretrained_cfg(arch, tag):
        return arch, oc.pretrained._clean_tag(tag)
    if _looks_like_path(tag):
        return arch, tag
    if not tags:
        raise UserError(f"open_clip architecture {arch} has no pretrained tag {tag!r} (open_clip knows none for it; "
                        f"give a weights file, or drop /{tag} and give --untrained for random weights)")
    raise UserError(f"unknown pretrained tag {tag!r} for open_clip {arch}{did_you_mean(tag, tags)}; "
                    f"its tags: {', '.join(tags)}")


# --------------------------------------------------------------------------------------------------------------- #
# the record a checkpoint keeps
# --------------------------------------------------------------------------------------------------------------- #
def _plain(value: Any) -> bool:
    """A value ``torch.load(weights_only=True)`` restores and JSON can hold: str/int/float/bool/None, lists, dicts."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


@dataclass(frozen=True)
class OpenClipSpec:
    """How to rebuild an open_clip model: architecture name, pretrained tag (or file, or None for random weights),
    the model configuration used (so a checkpoint rebuilds even where open_clip's registry differs) and the image
    preprocessing. ``to_dict`` gives plain values only, for ``torch.load(weights_only=True)``."""

    arch: str
    pretrained: str | None
    config: dict = field(hash=False)
    preprocess: dict = field(hash=False)
    backend: str = BACKEND

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "arch": self.arch, "pretrained": self.pretrained,
                "config": copy.deepcopy(self.config), "preprocess": copy.deepcopy(self.preprocess)}

    @classmethod
    def from_dict(cls, record: Any) -> "OpenClipSpec":
        """The spec of a checkpoint record; one-line UserError when the record is damaged."""
        what = "the checkpoint's open_clip model record"
        if not isinstance(record, Mapping):
            raise UserError(f"{what} is {type(record).__name__}, not a dict (damaged?)")
        if record.get("backend") != BACKEND:
            raise UserError(f"{what} names back-end {record.get('backend')!r:.40}, not {BACKEND!r} (damaged?)")
        arch, pretrained = record.get("arch"), record.get("pretrained")
        config, preprocess = record.get("config"), record.get("preprocess")
        if not isinstance(arch, str) or not arch:
            raise UserError(f"{what} has no architecture name (damaged?)")
        if pretrained is not None and not isinstance(pretrained, str):
            raise UserError(f"{what}: 'pretrained' is {type(pretrained).__name__}, not a string (damaged?)")
        if not isinstance(config, dict) or not _plain(config):
            raise UserError(f"{what}: 'config' is not a dict of plain values (damaged?)")
        for key, kind in (("embed_dim", int), ("vision_cfg", dict), ("text_cfg", dict)):
            if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
                raise UserError(f"{what}: config entry {key!r} is missing or not {kind.__name__} (damaged?)")
        _check_preprocess(preprocess, what)
        return cls(arch=arch, pretrained=pretrained, config=copy.deepcopy(config),
                   preprocess=copy.deepcopy(dict(preprocess)))


def _check_preprocess(preprocess: Any, what: str) -> None:
    if not isinstance(preprocess, Mapping):
        raise UserError(f"{what}: 'preprocess' is not a dict (damaged?)")
    for key in ("mean", "std"):
        value = preprocess.get(key)
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in value)
                or (key == "std" and min(value) <= 0)):
            raise UserError(f"{what}: preprocess {key!r} is not three finite numbers (damaged?)")
    if preprocess.get("interpolation") not in _INTERPOLATIONS:
        raise UserError(f"{what}: preprocess interpolation {preprocess.get('interpolation')!r:.30} is not one of "
                        f"{', '.join(_INTERPOLATIONS)} (damaged?)")
    if not isinstance(preprocess.get("resize_mode"), str):
        raise UserError(f"{what}: preprocess 'resize_mode' is not a string (damaged?)")


# --------------------------------------------------------------------------------------------------------------- #
# building
# --------------------------------------------------------------------------------------------------------------- #
def _refusal(config: Mapping[str, Any]) -> str | None:
    """Why mtil does not build this configuration, or None."""
    if "multimodal_cfg" in config:
        return "it is a captioning model (CoCa), not a contrastive CLIP"
    if config.get("text_cfg", {}).get("hf_model_name"):
        return (f"its text tower is the Hugging Face model {config['text_cfg']['hf_model_name']}, whose configuration "
                "transformers would fetch online")
    return None


def _instantiate(config: Mapping[str, Any]) -> nn.Module:
    """The open_clip model class of ``config`` (CLIP, or CustomTextCLIP when ``custom_text``), float32, eval mode."""
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs = copy.deepcopy(dict(config))
    custom = bool(kwargs.pop("custom_text", False))
    cls = CustomTextCLIP if custom else CLIP
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, ZeroDivisionError, RuntimeError) as exc:
        raise UserError(f"the open_clip configuration does not build ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:100]})") from None
    return model.float().eval()


def _shapes_on_meta(config: Mapping[str, Any]) -> dict[str, torch.Size] | None:
    """Parameter shapes of ``config`` without allocating (a damaged size must not build a giant model); None where
    a tower cannot be built on the meta device."""
    try:
        with torch.device("meta"):
            model = _instantiate(config)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - some timm towers compute on tensors while building
        return None
    return {k: v.shape for k, v in model.state_dict().items()}


def _preprocess_of(arch: str, pretrained: str | None) -> dict[str, Any]:
    """Mean, std, interpolation and resize mode from the pretrained tag (else the tags of ``arch`` when they all
    agree, else OpenAI's)."""
    if arch in _TINY_PREPROCESS:
        return copy.deepcopy(_TINY_PREPROCESS[arch])
    oc = _open_clip()
    tags = [pretrained] if pretrained and oc.pretrained.is_pretrained_cfg(arch, pretrained) \
        else oc.list_pretrained_tags_by_model(arch)
    found = []
    for tag in tags:
        cfg = oc.pretrained.get_pretrained_cfg(arch, tag)
        found.append({key: list(cfg.get(key, default)) if key in ("mean", "std") else cfg.get(key, default)
                      for key, default in _DEFAULT_PREPROCESS.items()})
    if found and all(f == found[0] for f in found):
        return found[0]
    return copy.deepcopy(_DEFAULT_PREPROCESS)


def _set_preprocess(model: nn.Module, spec: OpenClipSpec) -> None:
    from open_clip.model import set_model_preprocess_cfg

    set_model_preprocess_cfg(model, {"size": image_resolution(model), "mode": "RGB", "fill_color": 0,
                                     "mean": tuple(spec.preprocess["mean"]), "std": tuple(spec.preprocess["std"]),
                                     "interpolation": spec.preprocess["interpolation"],
                                     "resize_mode": spec.preprocess["resize_mode"]})
    model.mtil_spec = spec  # tokenize() reads the tokenizer of the configuration from it


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        hub = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def _hub_files(hf_hub: str) -> tuple[str, list[str]]:
    """(repo id, the file names to look for, safetensors first) of a pretrained tag's ``hf_hub`` entry."""
    repo_id, filename = os.path.split(hf_hub)  # 'org/repo/' or 'org/repo/file', as open_clip reads it
    filename = filename or _WEIGHTS
    names = [filename]
    if filename == _WEIGHTS:
        names.insert(0, _SAFE_WEIGHTS)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return repo_id, names


def _find_weights(arch: str, tag: str, clip_root: str | os.PathLike | None) -> Path:
    """The weights file of ``arch``/``tag`` (see the module docstring for the places), or a one-line UserError
    naming every place looked and how to get the file."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _open_clip().pretrained.get_pretrained_cfg(arch, tag)
    looked: list[str] = []
    repo_id, names = _hub_files(cfg["hf_hub"]) if cfg.get("hf_hub") else ("", [])
    url = cfg.get("url", "")
    local: list[Path] = []
    if clip_root is not None:
        root = Path(clip_root)
        local += [root / "open_clip" / repo_id / name for name in names] if repo_id else []
        local += [root / os.path.basename(url)] if url else []
    for path in local:
        if path.is_file():
            return path
    looked += [str(p) for p in local]
    cache = hf_hub_cache()
    for name in names:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(cache))
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    if repo_id:
        looked.append(f"{', '.join(names)} of {repo_id} in the Hugging Face cache {cache}")
    target = (Path(clip_root) if clip_root is not None else Path("<clip-root>")) / "open_clip" / repo_id
    how = (f"get it with `hf download {repo_id} {names[0]} --local-dir {target}` (or `huggingface-cli download`, "
           f"same arguments) on a machine with internet and copy that folder to the same place here") if repo_id \
        else f"fetch {url} and place it at {local[-1] if local else os.path.basename(url)}"
    raise UserError(f"open_clip weights {arch}/{tag} are missing: looked for {'; '.join(looked)}; {how}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file, read as data: safetensors, an OpenAI TorchScript archive's tensors, or a
    ``torch.save`` file (``weights_only``; an mtil checkpoint's or a ``{'state_dict': ...}`` file's weights)."""
    from mtil.models.torchscript_weights import NotTorchScript, is_torchscript_archive, read_torchscript_tensors
    from mtil.tensor_files import read_tensor_file

    if not path.is_file():
        raise UserError(f"open_clip weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            payload: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
            raise UserError(f"cannot read open_clip weights file {path} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:80]})") from None
    elif is_torchscript_archive(path):
        try:
            payload = read_torchscript_tensors(path)
        except NotTorchScript as exc:
            raise UserError(f"cannot read {path} as a TorchScript archive's weights: {exc}") from None
    else:
        payload = read_tensor_file(path, "open_clip weights file")
    if isinstance(payload, Mapping) and payload.get("format") == "mtil-checkpoint":
        payload = payload.get("model")
    elif isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not payload:
        raise UserError(f"open_clip weights file {path} holds no state dict")
    out = {}
    for key, value in payload.items():
        key = str(key)
        key = key[len("module."):] if key.startswith("module.") else key
        if key not in _OPENAI_EXTRAS:
            out[key] = value
    return out


def _fit(model_shapes: Mapping[str, torch.Size], state_dict: dict[str, Any], source: str) -> None:
    """One-line UserError unless ``state_dict`` has exactly the model's entries, as tensors of its shapes."""
    odd = next((k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise UserError(f"{source}: entry {odd!r} is {type(state_dict[odd]).__name__}, not a tensor (damaged?)")
    missing = [k for k in model_shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_shapes]
    wrong = [k for k in model_shapes if k in state_dict and tuple(state_dict[k].shape) != tuple(model_shapes[k])]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            first = f"{k} is {tuple(state_dict[k].shape)}, the model's {tuple(model_shapes[k])}"
        elif missing:
            first = f"no {missing[0]!r}"
        else:
            first = f"an unexpected {unexpected[0]!r}"
        raise UserError(f"{source} do not fit the model: {len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(wrong)} of another shape ({first})")


def _load_into(model: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """Load ``state_dict`` strictly (after open_clip's layout conversions), refusing non-finite weights."""
    from open_clip.model import CustomTextCLIP, convert_to_custom_text_state_dict

    from mtil.finite import first_nonfinite

    if isinstance(model, CustomTextCLIP):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    state_dict = dict(state_dict)
    for key in ("logit_scale", "logit_bias"):  # scalar in one release, shape [1] in another
        param = getattr(model, key, None)
        value = state_dict.get(key)
        if isinstance(param, torch.Tensor) and isinstance(value, torch.Tensor) and value.numel() == param.numel():
            state_dict[key] = value.reshape(param.shape)
    _fit({k: v.shape for k, v in model.state_dict().items()}, state_dict, source)
    bad = first_nonfinite(state_dict.items())
    if bad is not None:
        raise UserError(f"cannot use {source}: weight {bad}; they hold no usable model")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})


def build_open_clip(name: str, *, clip_root: str | os.PathLike | None, untrained: bool = False,
                    seed: int | None = None) -> tuple[nn.Module, OpenClipSpec]:
    """A float32 open_clip model in eval mode, and its spec. mtil's tiny configurations and ``untrained`` models get
    random weights (from ``seed`` when given); a real architecture needs a pretrained tag (or weights file) whose
    weights are found offline (module docstring), or a one-line UserError."""
    arch, pretrained = parse_name(name)
    oc = _open_clip()
    config = json.loads(json.dumps(oc.get_model_config(arch)))  # plain lists, a private copy
    why = _refusal(config)
    if why:
        raise UserError(f"mtil cannot use open_clip {arch}: {why}")
    known_tag = pretrained is not None and oc.pretrained.is_pretrained_cfg(arch, pretrained)
    if known_tag and oc.pretrained.get_pretrained_cfg(arch, pretrained).get("quick_gelu"):
        config["quick_gelu"] = True  # e.g. ViT-B-16/openai: open_clip would only warn and build GELU
    weights: Path | None = None
    if not untrained and (arch, pretrained) == TOYCLIP_TAG:
        from mtil.models import toyclip

        weights = toyclip.ASSET
        state_dict = toyclip.read_asset()[0]
    elif not untrained and pretrained is not None:
        weights = _find_weights(arch, pretrained, clip_root) if known_tag else Path(pretrained).expanduser()
        state_dict = _read_weights(weights)
    elif not untrained and arch not in TINY_NAMES:
        tags = oc.list_pretrained_tags_by_model(arch)
        listed = f"one of {', '.join(tags)}" if tags else "a weights file (open_clip knows no tag for it)"
        raise UserError(f"--model {name} needs pretrained weights: name {listed} as {PREFIX}{arch}/TAG, or ask for "
                        f"random weights with --untrained")
    if seed is not None:
        torch.manual_seed(seed)
    model = _instantiate(config)
    if weights is not None:
        _load_into(model, state_dict, f"the weights in {weights}")
    spec = OpenClipSpec(arch=arch, pretrained=pretrained if weights is not None else None, config=config,
                        preprocess=_preprocess_of(arch, pretrained))
    _set_preprocess(model, spec)
    return model, spec


def build_from_spec(spec: OpenClipSpec) -> nn.Module:
    """A model of ``spec`` with fresh (random) weights, e.g. on the meta device for a structural check."""
    model = _instantiate(spec.config)
    _set_preprocess(model, spec)
    return model


def check_weights(spec_dict: Mapping[str, Any], state_dict: Any, source: str) -> OpenClipSpec:
    """The record's spec, after checking (on the meta device) that ``state_dict`` fits it; one-line UserError."""
    spec = OpenClipSpec.from_dict(spec_dict)
    if not isinstance(state_dict, Mapping):
        raise UserError(f"{source} are not a dict of tensors but {type(state_dict).__name__}")
    shapes = _shapes_on_meta(spec.config)
    if shapes is not None:
        _fit(shapes, dict(state_dict), source)
    return spec


def model_from_spec(spec_dict: Mapping[str, Any], state_dict: Mapping[str, Any]) -> nn.Module:
    """The model a checkpoint recorded (``OpenClipSpec.to_dict()``) with its weights; one-line UserError when the
    record is damaged or does not match the weights. The global random state is left as it was."""
    spec = OpenClipSpec.from_dict(spec_dict)
    why = _refusal(spec.config)
    if why:
        raise UserError(f"mtil cannot use the checkpoint's open_clip {spec.arch}: {why}")
    if not isinstance(state_dict, Mapping):
        raise UserError(f"the checkpoint's weights are {type(state_dict).__name__}, not a dict of tensors")
    state_dict = dict(state_dict)
    source = f"the checkpoint's weights ({spec.arch})"
    shapes = _shapes_on_meta(spec.config)
    if shapes is not None:
        _fit(shapes, state_dict, source)
    with torch.random.fork_rng(devices=[]):
        model = _instantiate(spec.config)
    _load_into(model, state_dict, source)
    _set_preprocess(model, spec)
    return model


# --------------------------------------------------------------------------------------------------------------- #
# per-model facts
# --------------------------------------------------------------------------------------------------------------- #
def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding the native text tower's parts: the model itself (CLIP) or ``model.text``."""
    text = getattr(model, "text", None)
    return text if isinstance(text, nn.Module) else model


def image_resolution(model: nn.Module) -> int:
    """The side of the square images the model takes."""
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise UserError(f"the open_clip model takes images of size {size!r}; mtil needs square images")


def preprocess(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, interpolation) the model's weights were trained with."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return (tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)),
            str(cfg.get("interpolation", "bicubic")))


def resize_mode(model: nn.Module) -> str:
    """'shortest' (resize the short side, center crop: CLIP's) or 'squash' (resize to a square: SigLIP's)."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return str(cfg.get("resize_mode", "shortest"))


@functools.lru_cache(maxsize=8)
def _tokenizer(hf_name: str, context_length: int, kwargs_json: str):
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    kwargs = json.loads(kwargs_json)
    if not hf_name:
        return SimpleTokenizer(context_length=context_length, **kwargs)
    try:  # local files only: the tokenizer must already be in the hub cache
        return HFTokenizer(hf_name, context_length=context_length, cache_dir=str(hf_hub_cache()),
                           local_files_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        raise UserError(f"the tokenizer {hf_name} of this open_clip model is not in the Hugging Face cache "
                        f"{hf_hub_cache()} ({type(exc).__name__}); on a machine with internet run "
                        f"`hf download {hf_name}` and copy the cache here") from None


def tokenize(model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """Token ids (N x context length, long) from the model's own tokenizer, long sentences truncated (the end of
    text kept). A model built here knows its tokenizer; any other gets open_clip's default BPE tokenizer."""
    spec = getattr(model, "mtil_spec", None)
    text_cfg = spec.config.get("text_cfg", {}) if isinstance(spec, OpenClipSpec) else {}
    hf_name = text_cfg.get("hf_tokenizer_name") or ""
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if hf_name and text_cfg.get("tokenizer_mode"):
        kwargs["tokenizer_mode"] = text_cfg["tokenizer_mode"]
    tokenizer = _tokenizer(hf_name, int(model.context_length), json.dumps(kwargs, sort_keys=True))
    return tokenizer(list(texts)).long()


def pads_freely(model: nn.Module) -> bool:
    """True when padding after the end-of-text token never changes a text feature (a causal mask and pooling at
    the end-of-text token, found as the highest id: OpenAI's text tower), so tokens may be cut after the batch's
    last end-of-text token. False for SigLIP's pooling of the last position without a causal mask."""
    from open_clip.transformer import TextTransformer

    text = _text_tower(model)
    if text is not model and not isinstance(text, TextTransformer):
        return False  # a Hugging Face text tower
    pool = text.text_pool_type if text is model else text.pool_type
    if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
        return False
    return getattr(text, "attn_mask", None) is not None and pool == "argmax"


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``model.encode_text`` that also takes tokens shorter than the context length: cut padding where the model
    pads freely (the positional embedding and causal mask cut to the tokens' length), padded back with the pad id
    otherwise (open_clip's own encode_text needs the full length)."""
    length, context = tokens.shape[-1], int(model.context_length)
    if length == context:
        return model.encode_text(tokens, normalize=normalize)
    if length > context:
        raise ValueError(f"{length} tokens exceed the model's context length {context}")
    text = _text_tower(model)
    if not pads_freely(model):
        pad = int(getattr(text, "pad_id", 0))
        return model.encode_text(F.pad(tokens, (0, context - length), value=pad), normalize=normalize)
    pool = text.text_pool_type if text is model else text.pool_type
    eos = text.text_eos_id if text is model else text.eos_id
    from open_clip.transformer import text_global_pool

    cast = text.transformer.get_cast_dtype()
    x = text.token_embedding(tokens).to(cast) + text.positional_embedding[:length].to(cast)
    x = text.transformer(x, attn_mask=text.attn_mask[:length, :length])
    x = text_global_pool(text.ln_final(x), tokens, pool, eos_token_id=eos)
    projection = text.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return F.normalize(x, dim=-1) if normalize else x


def logit_bias(model: nn.Module) -> torch.Tensor | None:
    """SigLIP's learned logit bias (added to ``exp(logit_scale) * cosine``), None for CLIP-style models."""
    return getattr(model, "logit_bias", None)


def uses_sigmoid_loss(model: nn.Module) -> bool:
    """Whether the model trains with SigLIP's sigmoid loss (open_clip models with a logit bias do)."""
    return logit_bias(model) is not None


def embed_dim(model: nn.Module) -> int:
    """The dimension of the joint image-text embedding."""
    spec = getattr(model, "mtil_spec", None)
    if isinstance(spec, OpenClipSpec):
        return int(spec.config["embed_dim"])
    projection = _text_tower(model).text_projection
    return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])


def _attention_kind(blocks: nn.Module | None) -> str:
    first = next(iter(blocks), None) if blocks is not None else None
    attn = getattr(first, "attn", None)
    if attn is None:
        return ""
    if isinstance(attn, nn.MultiheadAttention):
        return "nn.MultiheadAttention"
    return f"{type(attn).__module__}.{type(attn).__qualname__}"


def block_prefixes(model: nn.Module) -> dict[str, str]:
    """Where the transformer blocks live and what they are:

    * ``visual`` / ``text``: module path of the block list (``visual.transformer.resblocks``,
      ``visual.trunk.blocks`` for a timm tower; ``transformer.resblocks`` or ``text.transformer.resblocks``), ""
      where the tower has none (a ResNet, a Hugging Face text model);
    * ``visual_attention`` / ``text_attention``: ``nn.MultiheadAttention`` or the class of the blocks' ``attn``;
    * ``token_layout``: ``NLD`` (open_clip's MultiheadAttention is batch-first; OpenAI's is ``LND``).
    """
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if isinstance(visual, VisionTransformer):
        vpath, vblocks = "visual.transformer.resblocks", visual.transformer.resblocks
    elif isinstance(getattr(getattr(visual, "trunk", None), "blocks", None), nn.Module):
        vpath, vblocks = "visual.trunk.blocks", visual.trunk.blocks
    else:
        vpath, vblocks = "", None
    text = _text_tower(model)
    tblocks = getattr(getattr(text, "transformer", None), "resblocks", None)
    if not isinstance(tblocks, nn.ModuleList):
        tpath, tblocks = "", None
    else:
        tpath = "transformer.resblocks" if text is model else "text.transformer.resblocks"
    layout = "NLD"
    for blocks in (vblocks, tblocks):
        attn = getattr(next(iter(blocks), None), "attn", None) if blocks is not None else None
        if isinstance(attn, nn.MultiheadAttention) and not attn.batch_first:
            layout = "LND"
    return {"visual": vpath, "text": tpath, "visual_attention": _attention_kind(vblocks),
            "text_attention": _attention_kind(tblocks), "token_layout": layout}
