"""The IMO adapter (intra-modal overlap correction, BMVC 2024): a parallel bottleneck on the MLP branch of every
residual block of CLIP's image transformer, switchable per forward pass.

**What a block computes.** clip-anytorch's ``ResidualAttentionBlock`` computes
``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``. With an adapter it computes::

    h = x + attn(ln_1(x))
    y = h + mlp(ln_2(h)) + scale * up(dropout(relu(down(h))))

The adapter reads ``h``, the block's stream *after* attention and *before* ``ln_2`` (the un-normalised input of the
MLP branch), as in the formula of the paper's facts (``x = x + mlp(ln_2(x)) + scale · up(relu(down(x)))``) and in
AdaptFormer, the parallel adapter it follows (no layer norm of its own). ``down`` is ``Linear(D, width)`` with
PyTorch's default weight initialisation and a zero bias; ``up`` is ``Linear(width, D)`` with weight and bias zero, so
a fresh adapter adds exact zeros and the model's features are bitwise unchanged. Dropout (0.1) acts between the
ReLU and ``up``, in training mode only. ``scale`` is a fixed number (not trained): the paper uses 0.03 for the
supervised adapter and 0.1 for the self-supervised one.

**Switching.** Adapters are created *on*. ``with imo_enabled(model, False): ...`` gives the original CLIP's
features from the same model (the block then runs exactly the original arithmetic), ``imo_enabled(model, True)``
the adapted ones; the previous state is restored on exit. :func:`set_imo_enabled` switches without a context.

**How it is attached.** Each block's class is switched to :class:`IMOResidualAttentionBlock` (a subclass whose
``forward`` adds the branch) and the adapter is registered as its sub-module ``imo_adapter``. CLIP's own parameter
names are untouched; the model's ``state_dict`` gains ``visual.transformer.resblocks.<i>.imo_adapter.*`` entries
(:func:`remove_imo_adapters` takes them away again). Sub-modules replaced by other code (peft's LoRA layers in
``attn`` or ``mlp``) keep working: the block calls whatever ``attn``/``mlp`` it holds.

**Files.** :func:`save_imo_adapters` writes ``{"format": "mtil-imo-adapter", "version": 1, "tensors":
imo_state(model), "meta": {...}}`` (plain tensors and values, written atomically); :func:`load_imo_adapters` reads
it with ``torch.load(weights_only=True)``. ``tensors`` keys are ``"<layer>.down.weight"``, ``"<layer>.down.bias"``,
``"<layer>.up.weight"``, ``"<layer>.up.bias"`` (the state dict of the :class:`torch.nn.ModuleList` of adapters).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from clip.model import ResidualAttentionBlock, VisionTransformer

from mtil.atomic import atomic_open
from mtil.errors import UserError
from mtil.finite import first_nonfinite
from mtil.tensor_files import DamagedFile, read_tensor_file, save_tensors

ADAPTER_ATTR = "imo_adapter"
FORMAT = "mtil-imo-adapter"
VERSION = 1
DEFAULT_WIDTH = 64
DEFAULT_SCALE = 0.1  # the self-supervised adapter's; the supervised one uses 0.03 (both: the paper's)
DEFAULT_DROPOUT = 0.1
_PARAM_SHAPES = ("down.weight", "down.bias", "up.weight", "up.bias")


class IMOAdapter(nn.Module):
    """``scale * up(dropout(relu(down(h))))``; ``up`` starts at zero, so a fresh adapter adds exact zeros."""

    def __init__(self, dim: int, width: int = DEFAULT_WIDTH, scale: float = DEFAULT_SCALE,
                 dropout: float = DEFAULT_DROPOUT, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.down = nn.Linear(dim, width, device=device, dtype=dtype)
        self.up = nn.Linear(width, dim, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.scale = float(scale)
        self.enabled = True
        with torch.no_grad():
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    @property
    def width(self) -> int:
        return self.down.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(F.relu(self.down(h))))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, enabled={self.enabled}"


class IMOResidualAttentionBlock(ResidualAttentionBlock):
    """clip-anytorch's block with the IMO branch (see the module docstring); off, it is the original arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.ln_1(x))
        y = h + self.mlp(self.ln_2(h))
        adapter = getattr(self, ADAPTER_ATTR)
        if adapter.enabled:
            y = y + adapter(h)
        return y


# ---------------------------------------------------------------------------------------------- finding blocks
def _visual(model: nn.Module) -> VisionTransformer:
    """The ViT image encoder of a CLIP (or the encoder itself); a ResNet one is a one-line error."""
    visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer):
        return visual
    from mtil.models.backend import OPEN_CLIP_BACKEND, backend_name

    if backend_name(model) == OPEN_CLIP_BACKEND or type(visual).__module__.startswith("open_clip"):
        raise UserError("the IMO adapter is built into clip-anytorch's ViT blocks and does not support open_clip "
                        "models yet: use a clip-anytorch model (an OpenAI name such as ViT-B/16, toyclip, tiny-vit)")
    kind = type(visual).__name__ if visual is not None else type(model).__name__
    raise UserError(f"the IMO adapter needs a ViT image encoder (ViT-B/32, ViT-B/16, ViT-L/14, toyclip, tiny-vit, "
                    f"micro-vit ...); this model's is {kind} (a ResNet CLIP has no transformer blocks to adapt)")


def _blocks(model: nn.Module) -> list[ResidualAttentionBlock]:
    return list(_visual(model).transformer.resblocks)


def has_imo_adapters(model: nn.Module) -> bool:
    """Whether :func:`add_imo_adapters` (or :func:`load_imo_adapters`) has run on this model."""
    visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        return False
    return any(isinstance(b, IMOResidualAttentionBlock) for b in visual.transformer.resblocks)


def imo_adapters(model: nn.Module) -> nn.ModuleList:
    """The adapters in layer order (the same module objects the blocks hold; e.g. for an optimiser)."""
    if not has_imo_adapters(model):
        raise UserError("this model has no IMO adapters: call add_imo_adapters or load_imo_adapters first")
    return nn.ModuleList(getattr(b, ADAPTER_ATTR) for b in _blocks(model))


def add_imo_adapters(model: nn.Module, width: int = DEFAULT_WIDTH, scale: float = DEFAULT_SCALE,
                     dropout: float = DEFAULT_DROPOUT) -> nn.ModuleList:
    """Give every block of ``model``'s image transformer a fresh (identity) adapter, switched on; returns them in
    layer order. A second call is refused (one set of adapters per model: load weights into it instead)."""
    blocks = _blocks(model)
    if has_imo_adapters(model):
        raise UserError("this model already has IMO adapters (add_imo_adapters was called before): load weights "
                        "into them with load_imo_adapters, or remove them with remove_imo_adapters")
    if width < 1:
        raise UserError(f"IMO adapter width must be at least 1, got {width}")
    odd = next((type(b).__name__ for b in blocks if type(b) is not ResidualAttentionBlock), None)
    if odd is not None:
        raise UserError(f"cannot add IMO adapters: a visual block is a {odd}, not clip.model.ResidualAttentionBlock")
    adapters = []
    for block in blocks:
        reference = block.ln_2.weight
        adapter = IMOAdapter(reference.shape[0], width, scale, dropout, device=reference.device,
                             dtype=reference.dtype)
        adapter.train(block.training)  # a model in eval mode gets adapters without active dropout
        block.__class__ = IMOResidualAttentionBlock
        block.add_module(ADAPTER_ATTR, adapter)
        adapters.append(adapter)
    return nn.ModuleList(adapters)


def remove_imo_adapters(model: nn.Module) -> None:
    """Undo :func:`add_imo_adapters`: plain blocks again, and a state dict with CLIP's keys only."""
    for block in _blocks(model):
        if isinstance(block, IMOResidualAttentionBlock):
            delattr(block, ADAPTER_ATTR)
            block.__class__ = ResidualAttentionBlock


# ---------------------------------------------------------------------------------------------- switching
def set_imo_enabled(model: nn.Module, on: bool) -> None:
    """Switch every adapter of ``model`` on (adapted features) or off (the original CLIP's)."""
    for adapter in imo_adapters(model):
        adapter.enabled = bool(on)


def imo_is_enabled(model: nn.Module) -> bool:
    return all(a.enabled for a in imo_adapters(model))


@contextlib.contextmanager
def imo_enabled(model: nn.Module, on: bool) -> Iterator[nn.Module]:
    """Inside the block the adapters are ``on`` (True: adapted features) or off (the original ones); each adapter's
    previous state comes back on exit, also after an exception."""
    adapters = list(imo_adapters(model))
    before = [a.enabled for a in adapters]
    try:
        for adapter in adapters:
            adapter.enabled = bool(on)
        yield model
    finally:
        for adapter, state in zip(adapters, before):
            adapter.enabled = state


# ---------------------------------------------------------------------------------------------- state and files
def imo_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights as plain CPU tensors (detached copies), keyed ``"<layer>.down.weight"`` ..."""
    return {k: v.detach().cpu().clone() for k, v in imo_adapters(model).state_dict().items()}


def imo_config(model: nn.Module) -> dict[str, Any]:
    """What the weights need to be rebuilt: ``width``, ``scale``, ``layers``, ``vision_width``, ``dropout``."""
    adapters = imo_adapters(model)
    first = adapters[0]
    return {"width": first.width, "scale": first.scale, "layers": len(adapters),
            "vision_width": first.down.in_features, "dropout": first.dropout.p}


def save_imo_adapters(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None,
                      adapters: nn.ModuleList | None = None) -> Path:
    """Write the adapters (plain tensors) and a small metadata dict (:func:`imo_config`, plus ``meta``: e.g. mode,
    model name) to ``path`` atomically: a crash leaves the old file or none, never half of one. ``adapters``: save
    these instead of the model's own (e.g. an EMA teacher's copy of them; same shapes, the model's scale)."""
    path = Path(path)
    own = imo_adapters(model)
    if adapters is not None and [tuple(p.shape) for p in adapters.parameters()] != \
            [tuple(p.shape) for p in own.parameters()]:
        raise ValueError("the adapters to save do not have the shapes of the model's own")
    tensors = imo_state(model) if adapters is None else \
        {k: v.detach().cpu().clone() for k, v in adapters.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "tensors": tensors, "meta": {**imo_config(model), **(meta or {})}}
    with atomic_open(path, "wb") as handle:
        save_tensors(payload, handle)
    return path


def read_imo_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of an adapter file, checked for form; a one-line UserError naming ``path`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"IMO adapter file {path} does not exist (train one with python -m mtil.imo)")
    try:
        payload = read_tensor_file(path, "IMO adapter file")
    except DamagedFile:
        raise
    except UserError as exc:  # not a torch file, pickled objects ...
        raise UserError(f"{exc}; damaged, or not written by python -m mtil.imo") from None
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not an IMO adapter file (no format {FORMAT!r}); write one with python -m mtil.imo")
    tensors, meta = payload.get("tensors"), payload.get("meta")
    if not isinstance(tensors, Mapping) or not isinstance(meta, Mapping) or \
            not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UserError(f"IMO adapter file {path} is damaged: its 'tensors' or 'meta' entry is not what was written")
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise UserError(f"cannot use IMO adapter file {path}: weight {bad} (train it again, with a lower --lr)")
    return dict(tensors), dict(meta)


def _file_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(layers, width, vision width) the tensors describe, or None when they are not a complete adapter set."""
    layers = sorted({int(k.split(".", 1)[0]) for k in tensors if k.split(".", 1)[0].isdigit()})
    if not layers or layers != list(range(len(layers))):
        return None
    if set(tensors) != {f"{i}.{p}" for i in layers for p in _PARAM_SHAPES}:
        return None
    down = tensors["0.down.weight"]
    if down.dim() != 2:
        return None
    width, dim = down.shape
    for i in layers:
        expected = {"down.weight": (width, dim), "down.bias": (width,), "up.weight": (dim, width), "up.bias": (dim,)}
        if any(tuple(tensors[f"{i}.{p}"].shape) != s for p, s in expected.items()):
            return None
    return len(layers), width, dim


def _checked_layout(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> tuple[int, int, int]:
    """(layers, width, vision width) of an adapter file's tensors; a one-line UserError when they are not a set."""
    layout = _file_layout(tensors)
    if layout is None:
        raise UserError(f"IMO adapter file {path} is damaged: its tensors are not a complete set of "
                        f"down/up weights and biases per layer")
    return layout


def check_imo_fits(tensors: Mapping[str, torch.Tensor], model: nn.Module, path: str | os.PathLike) -> None:
    """A one-line UserError unless the adapter ``tensors`` read from ``path`` fit ``model``'s image transformer
    (layers and width; shapes only, so ``model`` may live on the meta device)."""
    layers, width, dim = _checked_layout(tensors, path)
    blocks = _blocks(model)
    if (layers, dim) != (len(blocks), blocks[0].ln_2.weight.shape[0]):
        raise UserError(f"IMO adapter file {path} holds {layers} layer(s) of width {dim}, but this model's image "
                        f"transformer has {len(blocks)} layer(s) of width {blocks[0].ln_2.weight.shape[0]}: it was "
                        f"trained for another model")


def load_imo_adapters(model: nn.Module, path: str | os.PathLike, dropout: float | None = None) -> dict[str, Any]:
    """Load an adapter file into ``model`` and return its metadata. A model without adapters gets them (width and
    scale from the file; ``dropout`` from the file unless given); a model with adapters must have the file's width
    and layer count. The adapters take the file's ``scale`` and are switched on. Shapes that do not fit are a
    one-line UserError naming the file, what it holds and what this model expects."""
    tensors, meta = read_imo_file(path)
    layers, width, dim = _checked_layout(tensors, path)
    blocks = _blocks(model)
    model_dim = blocks[0].ln_2.weight.shape[0]
    current_width = imo_adapters(model)[0].width if has_imo_adapters(model) else width
    if (layers, dim, width) != (len(blocks), model_dim, current_width):
        raise UserError(f"IMO adapter file {path} holds {layers} layer(s) of width {dim} with adapters of width "
                        f"{width}, but this model expects {len(blocks)} layer(s) of width {model_dim} with adapters "
                        f"of width {current_width}: it was trained for another model (its meta: model "
                        f"{meta.get('model', 'unknown')!s:.60})")
    scale = meta.get("scale", DEFAULT_SCALE)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise UserError(f"IMO adapter file {path} is damaged: its scale is {scale!r:.40}")
    if not has_imo_adapters(model):
        file_dropout = meta.get("dropout", DEFAULT_DROPOUT)
        if not isinstance(file_dropout, (int, float)) or not 0 <= file_dropout < 1:
            file_dropout = DEFAULT_DROPOUT  # only a training-time setting: a damaged value is not worth refusing
        add_imo_adapters(model, width, float(scale), dropout if dropout is not None else float(file_dropout))
    adapters = imo_adapters(model)
    reference = adapters[0].down.weight
    adapters.load_state_dict({k: v.to(device=reference.device, dtype=reference.dtype) for k, v in tensors.items()})
    for adapter in adapters:
        adapter.scale = float(scale)
        adapter.enabled = True
        if dropout is not None:
            adapter.dropout.p = dropout
    return meta


# ---------------------------------------------------------------------------------------------- other weights
def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names, relative to ``model.visual``, of every adapter parameter, in :func:`imo_adapters` order."""
    names = []
    for i, _ in enumerate(_blocks(model)):
        names += [f"transformer.resblocks.{i}.{ADAPTER_ATTR}.{p}" for p in _PARAM_SHAPES]
    return names


def encode_image_with(model: nn.Module, adapters: nn.ModuleList, images: torch.Tensor) -> torch.Tensor:
    """``model.encode_image(images)`` computed with the weights of ``adapters`` (e.g. an EMA teacher's copy) in
    place of the model's own, without copying or changing the model (``torch.func.functional_call``)."""
    own = imo_adapters(model)
    if len(adapters) != len(own):
        raise ValueError(f"{len(adapters)} adapters given for {len(own)} layers")
    tensors = []
    for adapter in adapters:
        tensors += [adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias]
    visual = _visual(model)
    return torch.func.functional_call(visual, dict(zip(adapter_parameter_names(model), tensors)),
                                      (images.type(visual.conv1.weight.dtype),), strict=False)
