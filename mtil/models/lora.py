"""LoRA on CLIP through peft: adapters that really act on the attention projections (q, k, v, o, any subset) and the
MLP linears.

**Why attention needs care.** CLIP's attention is ``nn.MultiheadAttention``, whose forward reads
``in_proj_weight`` (q, k and v packed, ``3D x D``) and ``out_proj.weight`` *functionally*
(``F.multi_head_attention_forward``); ``out_proj.forward`` is never called. Wrapping ``attn.out_proj`` as a
``Linear`` therefore changes nothing (the seed's bug). Adapters here act on those weights:

* Attention targets use peft's LoRA layer for ``nn.MultiheadAttention`` (``peft.tuners.lora.layer
  .MultiheadAttention``), which adapts ``in_proj_weight`` and ``out_proj.weight`` by putting ``W + (alpha / r) B A``
  in place of ``W`` for the duration of each forward. peft's own layer has one adapter over the packed ``in_proj``
  (one ``A`` shared by q, k and v: ``B`` is ``3D x r``) plus one over ``out_proj``, always both, and its
  merge/unmerge round trip (``W <- (W + dW) - dW``) drifts the frozen base weights by rounding and replaces their
  Parameter objects at every forward. ``lora_layers.LoraMultiheadAttention`` (registered with peft as the custom LoRA
  layer for ``nn.MultiheadAttention``) keeps peft's machinery but (1) splits the packed adapter into **separate q, k
  and v adapters** of rank r each: its ``lora_A`` is ``cat(A_q, A_k, A_v)`` (``3r x D``) and its ``lora_B`` is
  ``block_diag(B_q, B_k, B_v)`` (``3D x 3r``), so ``B A = [B_q A_q; B_k A_k; B_v A_v]``, and peft's ``out_proj``
  adapter is the **o** adapter; (2) keeps only the **selected parts**: a q, k or v part that is not selected has
  no Parameter (its third of ``in_proj_weight`` is used as it is), and without o ``out_proj`` is the plain Linear
  again, so unselected parts have no trainable parameters and contribute exactly nothing; (3) puts the merged
  weights in front of the base parameters for one forward and takes them away again, so the base weights are
  never modified and never replaced.
* ``nn.Linear`` targets (``mlp.c_fc``, ``mlp.c_proj``) are peft's ordinary LoRA ``Linear``
  (``y = W x + b + (alpha / r) B A dropout(x)``). ``--lora-dropout`` acts on these only: attention adapters (o
  included) act through the weights, where there is no input to drop.
* The ResNet models' ``AttentionPool2d`` projections (``q_proj``, ``k_proj``, ``v_proj``, ``c_proj``, read
  functionally by ``F.multi_head_attention_forward``) are refused as targets: an adapter there would have no effect.

Every ``B`` starts at zero, so a fresh adapter leaves every output exactly unchanged.

**Targets** (``--lora-target-modules``) follow peft's rule: a target ``T`` matches every module named ``T`` or
ending in ``.T``. For an attention module ``N`` (``....attn``) the names ``N.<part>`` are matched by the same rule,
selecting parts of it:

* ``attn``: q, k, v and o
* ``attn.in_proj`` (or ``attn.in_proj_weight``): q, k and v
* ``attn.out_proj``: o (the original tool's default ``attn.out_proj,mlp.c_fc,mlp.c_proj`` adapts o and the MLP)
* ``attn.q``, ``attn.k``, ``attn.v``, ``attn.o``: that one part
* ``mlp.c_fc``, ``mlp.c_proj``: the MLP linears

Several targets hitting the same attention select the union of their parts (``attn.q,attn.v``: q and v). A longer
prefix narrows the layers (``resblocks.0.attn.q``: q of layer 0 of both encoders; ``visual.transformer.resblocks.0
.attn.o``: o of the image encoder's layer 0). A target that matches nothing (or only refused modules) is a
:class:`UserError` listing the accepted names: the suffix patterns of the model's adaptable modules (the name after
the last layer index, e.g. ``attn``, ``mlp.c_fc``) and the attention part names (``attn.in_proj``,
``attn.out_proj``, ``attn.q`` ...), see ``scripts/list_clip_layers.py``.

**Adapter parts and sharing.** Every adapter is a *part*: q, k, v or o of an attention layer (those selected), or a
Linear (named by its last name: ``c_fc``, ``c_proj``). A part owns ``A`` (``r x in``) and ``B`` (``out x r``). With
``shared=True`` a registry keyed by ``(encoder, layer type, shape of A, shape of B)`` (layer type ``attn`` or
``mlp`` from the module path; encoder ``image`` for ``visual.*``, else ``text``) makes every later part with the
same key reuse the *first* part's ``A`` and ``B`` Parameter objects; with ``split_qkvo=True`` the part name joins
the key (q shares with q, o with o). Attention and MLP never share (layer type), nor do the two encoders
(``--train-mode image`` must leave the text encoder untouched, and tiny models have equal widths).

**Trainable-parameter count** (:func:`count_trainable`, right after :func:`inject_lora`), for a part with input
width ``i`` and output width ``o`` of size ``r (i + o)``:

* plain:  ``N = sum over parts p of r (i_p + o_p)``
* shared: ``N = sum over distinct keys k of r (i_k + o_k)``, key = (encoder, layer type, shapes)
* shared + split: the same sum, key = (encoder, layer type, part name, shapes)

For CLIP transformers (width ``D``, ``L`` layers, MLP hidden ``4D``) an attention part costs ``2 r D`` and c_fc,
c_proj ``5 r D`` each. With ``a`` selected attention parts per layer (0 to 4) and ``m`` MLP targets (0 to 2), every
layer of both encoders targeted:

* plain:  ``N = (2a + 5m) r (D_img L_img + D_txt L_txt)``
* shared: ``N = (2 [a > 0] + 5m) r (D_img + D_txt)``  (all attention parts share one ``2 r D`` pair per encoder)
* shared + split: ``N = (2a + 5m) r (D_img + D_txt)``  (one pair per attention part name per encoder)

The default ``attn,mlp.c_fc,mlp.c_proj`` (a = 4, m = 2): plain ``18 r D`` per layer, shared ``12 r D`` per
encoder, shared + split ``18 r D`` per encoder. The original tool's ``attn.out_proj,mlp.c_fc,mlp.c_proj`` (a = 1,
m = 2): o (``2 r D``) + c_fc + c_proj (``5 r D`` each) = ``12 r D`` per layer plain, ``12 r D`` per encoder shared
(with or without split).

(ResNet models: their image encoder has no target, so the image terms are 0.)
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from mtil.errors import UserError

ADAPTER = "default"  # peft's adapter name
DEFAULT_TARGETS = ("attn", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    shared: bool = False
    split_qkvo: bool = False

    @classmethod
    def from_args(cls, config: argparse.Namespace) -> "LoraSettings":
        return cls(r=config.lora_r, alpha=float(config.lora_alpha), dropout=config.lora_dropout,
                   targets=tuple(config.lora_target_modules), shared=config.lora_shared,
                   split_qkvo=config.lora_shared_split_qkvo)


def _settings(config: LoraSettings | argparse.Namespace) -> LoraSettings:
    return config if isinstance(config, LoraSettings) else LoraSettings.from_args(config)


def _peft_layers():
    """peft's LoRA layer module, or None when peft was never imported (then no model can hold a LoRA layer)."""
    return sys.modules.get("peft.tuners.lora.layer")


def _is_lora_layer(module: nn.Module) -> bool:
    layers = _peft_layers()
    return layers is not None and isinstance(module, layers.LoraLayer)


def _is_lora_attention(module: nn.Module) -> bool:
    layers = _peft_layers()
    return layers is not None and isinstance(module, layers.MultiheadAttention)


# ---------------------------------------------------------------------------------------------- targets
ATTENTION_PARTS = ("q", "k", "v", "o")  # q, k, v: the thirds of in_proj_weight (in row order); o: out_proj
# Names below an attention module N that select parts of it: a target matching "N.<name>" selects these parts.
PART_NAMES = {"in_proj": ("q", "k", "v"), "in_proj_weight": ("q", "k", "v"), "out_proj": ("o",),
              "q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",)}
LISTED_PART_NAMES = ("in_proj", "out_proj", "q", "k", "v", "o")  # in_proj_weight: an alias, not listed


def _is_functional_linear(parent: nn.Module | None) -> bool:
    """Linears whose forward is never called: their parent reads ``.weight`` directly."""
    if isinstance(parent, nn.MultiheadAttention) or _is_lora_attention(parent):
        return True
    return type(parent).__name__ == "AttentionPool2d"  # clip.model.AttentionPool2d: F.multi_head_attention_forward


def _suffix_pattern(name: str) -> str:
    """``visual.transformer.resblocks.3.mlp.c_fc`` -> ``mlp.c_fc`` (the name after the last layer index)."""
    parts = name.split(".")
    last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last_index + 1:]) or name


@dataclass
class LayerInfo:
    name: str
    kind: str  # "MultiheadAttention" or "Linear"
    in_features: int
    out_features: int
    adaptable: bool  # False: read functionally, an adapter on the module itself would have no effect
    parent_type: str = ""  # the type name of the parent module
    pattern: str = field(init=False)

    def __post_init__(self):
        self.pattern = _suffix_pattern(self.name)

    @property
    def is_out_proj(self) -> bool:
        """The ``out_proj`` of an ``nn.MultiheadAttention``: not adaptable as a Linear, but as the o part of its
        attention (``attn.out_proj``)."""
        return self.kind == "Linear" and self.parent_type == "MultiheadAttention"


def linear_layers(model: nn.Module) -> list[LayerInfo]:
    """Every ``nn.Linear`` and ``nn.MultiheadAttention`` of the model (a LoRA-wrapped one under its own name), with
    whether LoRA can act on it as a module."""
    parents = {}
    for name, module in model.named_modules():
        for child_name, _ in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
    layers = []
    for name, module in model.named_modules():
        if _inside_lora(name):
            continue
        if _is_lora_layer(module):
            module = module.get_base_layer()
        parent = parents.get(name)
        if isinstance(parent, nn.MultiheadAttention) or _is_lora_attention(parent):
            parent_type = "MultiheadAttention"
        else:
            parent_type = type(parent).__name__ if parent is not None else ""
        if isinstance(module, nn.MultiheadAttention):
            layers.append(LayerInfo(name, "MultiheadAttention", module.embed_dim, module.embed_dim, True,
                                    parent_type))
        elif isinstance(module, nn.Linear):
            layers.append(LayerInfo(name, "Linear", module.in_features, module.out_features,
                                    not _is_functional_linear(parent), parent_type))
    return layers


def _inside_lora(name: str) -> bool:
    """True for modules peft created or wrapped below a LoRA layer (``....base_layer``, ``lora_A`` ...)."""
    return ".base_layer" in f".{name}" or ".lora_" in f".{name}"


def _part_label(parts: Sequence[str]) -> str:
    return ", ".join(parts) + " of MultiheadAttention"


def accepted_targets(model: nn.Module) -> dict[str, str]:
    """Suffix pattern -> 'Type, N layers' for what --lora-target-modules accepts: the modules LoRA can act on and,
    after each attention pattern, its part names (``attn.in_proj`` -> 'q, k, v of MultiheadAttention, N layers')."""
    counts: dict[str, list] = {}

    def add(pattern: str, kind: str) -> None:
        counts.setdefault(pattern, [kind, 0])[1] += 1

    for layer in linear_layers(model):
        if layer.kind == "MultiheadAttention":
            add(layer.pattern, layer.kind)
            for part_name in LISTED_PART_NAMES:
                add(f"{layer.pattern}.{part_name}", _part_label(PART_NAMES[part_name]))
        elif layer.adaptable:
            add(layer.pattern, layer.kind)
    return {p: f"{kind}, {n} layer{'s' if n != 1 else ''}" for p, (kind, n) in counts.items()}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _attention_parts_hit(name: str, target: str) -> set[str]:
    """The parts of the attention module ``name`` that ``target`` selects (empty: none)."""
    parts = set(ATTENTION_PARTS) if _matches(name, target) else set()
    for part_name, selected in PART_NAMES.items():
        if _matches(f"{name}.{part_name}", target):
            parts.update(selected)
    return parts


def select_targets(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[str, ...] | None]:
    """Module name -> what the targets adapt there: the selected attention parts (in q, k, v, o order; the union
    over targets) for an attention module, None for a Linear. A target matching nothing adaptable is a one-line
    UserError listing the accepted names."""
    layers = linear_layers(model)
    selected: dict[str, set[str] | None] = {}
    for target in targets:
        found = False
        for layer in layers:
            if layer.kind == "MultiheadAttention":
                parts = _attention_parts_hit(layer.name, target)
                if parts:
                    selected.setdefault(layer.name, set()).update(parts)
                    found = True
            elif layer.adaptable and _matches(layer.name, target):
                selected.setdefault(layer.name, None)
                found = True
        if not found:
            available = ", ".join(f"{p} ({d})" for p, d in accepted_targets(model).items()) or "none"
            hits = [layer for layer in layers if _matches(layer.name, target)]
            why = ""
            if hits:
                why = (f" ({hits[0].name} is read functionally by its parent {hits[0].parent_type}, so an adapter "
                       f"there would have no effect; LoRA adapts the transformers' attention (q, k, v, o) and MLP "
                       f"linears, not the ResNet attention pool)")
            raise UserError(f"--lora-target-modules {target!r} matches no layer LoRA can adapt{why}; "
                            f"available: {available}")
    return {name: None if parts is None else tuple(p for p in ATTENTION_PARTS if p in parts)
            for name, parts in selected.items()}


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The module names the targets select (attention modules for their parts, Linears); a target matching nothing
    adaptable is a one-line UserError. :func:`select_targets` also says which attention parts."""
    return list(select_targets(model, targets))


# ---------------------------------------------------------------------------------------------- injection
@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int | None):
    """Draw from ``seed`` inside the block and leave the global RNG streams as they were (no-op for None)."""
    if seed is None:
        yield
        return
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def has_lora(model: nn.Module) -> bool:
    return any(_is_lora_layer(m) for m in model.modules())


def inject_lora(model: nn.Module, config: LoraSettings | argparse.Namespace, seed: int | None = None) -> nn.Module:
    """Inject fresh adapters (``B = 0``: outputs unchanged) in place with ``peft.inject_adapter_in_model``;
    returns the same model object (still a ``clip.model.CLIP``). Only adapter parameters require grad afterwards.
    ``seed``: initialise the adapters from this seed without touching the global RNG streams."""
    from peft import LoraConfig, inject_adapter_in_model

    from mtil.models.lora_layers import LoraMultiheadAttention

    settings = _settings(config)
    if has_lora(model):
        raise RuntimeError("the model already holds LoRA adapters: merge_lora() them first")
    selection = select_targets(model, settings.targets)
    names = list(selection)
    lora_config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$", bias="none")
    lora_config._register_custom_module({nn.MultiheadAttention: LoraMultiheadAttention})
    with _seeded(model, seed):
        result = inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER)
    assert result is model
    for name, parts in selection.items():
        if parts is not None and parts != ATTENTION_PARTS:
            model.get_submodule(name).keep_parts(ADAPTER, parts)
    if settings.shared:
        share_adapters(model, split_qkvo=settings.split_qkvo)
    return model


# ---------------------------------------------------------------------------------------------- parts and sharing
@dataclass
class AdapterPart:
    """One adapter: ``A`` is ``getattr(a_owner, a_attr)`` (r x in), ``B`` is ``getattr(b_owner, b_attr)`` (out x r)."""

    module: str  # the LoRA layer's module name, e.g. visual.transformer.resblocks.0.attn
    part: str  # q, k, v, o, or the Linear's own name (c_fc, c_proj)
    layer_type: str  # attn or mlp (or linear)
    encoder: str  # image or text
    a_owner: nn.Module
    a_attr: str
    b_owner: nn.Module
    b_attr: str

    @property
    def A(self) -> nn.Parameter:
        return getattr(self.a_owner, self.a_attr)

    @property
    def B(self) -> nn.Parameter:
        return getattr(self.b_owner, self.b_attr)

    def key(self, split_qkvo: bool) -> tuple:
        shapes = (tuple(self.A.shape), tuple(self.B.shape))
        return (self.encoder, self.layer_type, *((self.part,) if split_qkvo else ()), shapes)


def _layer_type(name: str, module: nn.Module) -> str:
    if _is_lora_attention(module) or name.split(".")[-1] == "attn":
        return "attn"
    if "mlp" in name.split("."):
        return "mlp"
    return "linear"


def adapter_parts(model: nn.Module) -> list[AdapterPart]:
    """Every adapter part of the model, in module order (attention layers give their adapted parts among q, k, v,
    o, in that order)."""
    if _peft_layers() is None:
        return []
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from mtil.models.lora_layers import LoraMultiheadAttention

    parts = []
    for name, module in model.named_modules():
        if not _is_lora_layer(module) or _inside_lora(name):
            continue
        encoder = "image" if name.startswith("visual.") else "text"
        kind = _layer_type(name, module)
        if isinstance(module, LoraMultiheadAttention):
            a, b = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
            parts += [AdapterPart(name, p, kind, encoder, a, p, b, p) for p in a.parts]
            out = module.out_lora()
            if out is not None and ADAPTER in out.lora_A:
                parts.append(AdapterPart(name, "o", kind, encoder, out.lora_A[ADAPTER], "weight",
                                         out.lora_B[ADAPTER], "weight"))
        elif isinstance(module, PeftLoraLinear):
            parts.append(AdapterPart(name, name.split(".")[-1], kind, encoder, module.lora_A[ADAPTER], "weight",
                                     module.lora_B[ADAPTER], "weight"))
        else:
            raise TypeError(f"unexpected LoRA layer {type(module).__name__} at {name}")
    return parts


def share_adapters(model: nn.Module, split_qkvo: bool = False) -> dict[tuple, AdapterPart]:
    """Make every part reuse the ``A`` and ``B`` Parameter objects of the first part with its key (see the module
    docstring); returns the registry key -> owning part."""
    registry: dict[tuple, AdapterPart] = {}
    for part in adapter_parts(model):
        key = part.key(split_qkvo)
        owner = registry.setdefault(key, part)
        if owner is not part:
            setattr(part.a_owner, part.a_attr, owner.A)
            setattr(part.b_owner, part.b_attr, owner.B)
    return registry


# ---------------------------------------------------------------------------------------------- names and counts
def is_lora_name(name: str) -> bool:
    return ".lora_" in f".{name}"


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters (shared ones once, under their first owner's name)."""
    return [n for n, _ in model.named_parameters() if is_lora_name(n)]


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if is_lora_name(n)}


def count_trainable(model: nn.Module) -> int:
    """Trainable parameters, each shared Parameter counted once (the formulas are in the module docstring)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plain_name(name: str) -> str:
    """A peft-wrapped base name back to CLIP's: ``attn.base_layer.out_proj.base_layer.weight`` ->
    ``attn.out_proj.weight``."""
    return ".".join(p for p in name.split(".") if p != "base_layer")


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters, under plain CLIP names (a plain model's own state dict)."""
    return {plain_name(k): v for k, v in model.state_dict().items() if not is_lora_name(k)}


def base_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The base (non-adapter) parameters under plain CLIP names."""
    return {plain_name(n): p for n, p in model.named_parameters() if not is_lora_name(n)}


# ---------------------------------------------------------------------------------------------- merging
def _top_lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in list(model.named_modules()):
        if _is_lora_layer(module) and not _inside_lora(name):
            yield name, module


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Add every adapter's ``(alpha / r) B A`` into its base weight and put the base modules back, leaving a plain
    CLIP whose ``state_dict()`` has exactly the original keys (in the original order). Weights (and thirds of
    ``in_proj_weight``) that no adapter adapts are left bitwise as they were."""
    if _peft_layers() is None:
        return
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from mtil.models.lora_layers import LoraMultiheadAttention

    for name, module in list(_top_lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if isinstance(module, LoraMultiheadAttention):
            base = module.merge_into_base()  # only the adapted thirds of in_proj_weight; out_proj.weight if o
        elif isinstance(module, PeftLoraLinear):
            base = module.get_base_layer()
            for adapter in adapters:
                base.weight.add_(module.get_delta_weight(adapter).to(base.weight.dtype))
        else:
            raise TypeError(f"cannot merge LoRA layer {type(module).__name__} at {name}")
        setattr(parent, child, base)
    if "peft_config" in model.__dict__:
        del model.peft_config
