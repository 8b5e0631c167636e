"""``--lr-mult-vision / --lr-mult-text / --lr-mult-proj``: per-part learning rates for fine-tuning CLIP's weights.

Seed 002's "two learning rates" baseline (its config: vision 1.0, text 0.1, projection 1.0). CLIP's parameters
fall in three parts, by name:

* **proj**: the maps into the joint embedding space and the temperature: ``visual.proj`` (ViT), the attention
  pool's output projection ``visual.attnpool.c_proj.weight`` / ``.bias`` (ResNet: its equivalent of
  ``visual.proj``), ``text_projection`` (open_clip SigLIP's ``text.text_projection``), and ``logit_scale`` (and
  SigLIP's ``logit_bias``; only where a method trains them, e.g. contrastive);
* **vision**: every other ``visual.*`` parameter (the image encoder);
* **text**: every other CLIP parameter (token and positional embeddings, the text transformer, ``ln_final``).

Each trainable parameter's group gets ``lr = (its group's lr) × the part's multiplier`` (1 for a part without a
flag); parameters outside CLIP (the linear head of ``image-fc``) keep their group's lr. The component reshapes the
groups after the method has (``Method.parameter_groups``; the engine calls the method's first), splitting each of
them and keeping its settings. ``--warmup-length`` and the cosine schedule scale every group by the same factor, so each part
warms up to its own peak. It needs CLIP weights that train: refused with ``--train-mode fc``, with ``--lora``, and
with methods that train their own modules instead (``--method embedding-adapter``).
"""
from __future__ import annotations

from typing import Any

from mtil.engine.method import Component
from mtil.errors import UserError
from mtil.flags import add_flag, non_negative_float
from mtil.models.train_modes import trainable_names
from mtil.registry import register

PARTS = ("vision", "text", "proj")
PROJECTIONS = frozenset({"visual.proj", "visual.attnpool.c_proj.weight", "visual.attnpool.c_proj.bias",
                         "text_projection", "logit_scale", "logit_bias",  # logit_bias: SigLIP's (open_clip)
                         "text.text_projection", "text.text_projection.weight", "text.text_projection.bias"})
FLAGS = {part: f"lr_mult_{part}" for part in PARTS}


def clip_part(name: str) -> str:
    """vision, text or proj for a CLIP parameter name (see the module's docstring)."""
    if name in PROJECTIONS:
        return "proj"
    return "vision" if name.startswith("visual.") else "text"


def multipliers_of(config) -> dict[str, float]:
    """The multiplier of every part (1.0 where its flag is not given)."""
    return {part: (1.0 if getattr(config, dest) is None else getattr(config, dest)) for part, dest in FLAGS.items()}


def split_groups(groups: list[dict[str, Any]], names: dict[int, str], base_lr: float,
                 multipliers: dict[str, float]) -> list[dict[str, Any]]:
    """Each group split by part (in the order vision, text, proj, then parameters outside CLIP), every other
    setting of the group kept, ``lr`` multiplied; ``names``: id(parameter) -> its CLIP name."""
    out: list[dict[str, Any]] = []
    for group in groups:
        lr = group.get("lr", base_lr)
        by_part: dict[str, list] = {}
        for param in group["params"]:
            name = names.get(id(param))
            by_part.setdefault("head" if name is None else clip_part(name), []).append(param)
        for part in (*PARTS, "head"):
            if by_part.get(part):
                factor = multipliers.get(part, 1.0)
                out.append({**group, "params": by_part[part], "lr": lr * factor, "part": part})
    return out


@register
class PartLearningRates(Component):
    name = "part_lr"
    supports_distributed = True  # only the optimiser's parameter groups
    summary = "per-part learning rates (vision / text / projections)"
    enable_flag = "--lr-mult-vision / --lr-mult-text / --lr-mult-proj"
    flag_group = ("Per-part learning rates",
                  "Multipliers of --lr for CLIP's image encoder, text encoder and projections (seed 002's 'two "
                  "learning rates'; docs/methods/part-lr.md).")
    conflicts = {"lora": "--lora trains adapters instead of CLIP's weights, so no CLIP part would take a "
                         "multiplier: use one of them"}
    order = 5.0

    @classmethod
    def run_label(cls, config) -> None:
        return None  # learning rates, like --lr: a setting of the run, not a method of its own

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--lr-mult-vision", role="shapes_optimizer", type=non_negative_float, default=None, metavar="X",
                 help="--lr multiplier of the image encoder (visual.* except visual.proj / the ResNet attention "
                      "pool's c_proj).")
        add_flag(group, "--lr-mult-text", role="shapes_optimizer", type=non_negative_float, default=None, metavar="X",
                 help="--lr multiplier of the text encoder (token and positional embeddings, text transformer, "
                      "ln_final).")
        add_flag(group, "--lr-mult-proj", role="shapes_optimizer", type=non_negative_float, default=None, metavar="X",
                 help="--lr multiplier of the projections into the joint space (visual.proj or "
                      "visual.attnpool.c_proj, text_projection) and of logit_scale where it trains.")

    @classmethod
    def enabled(cls, config) -> bool:
        return any(getattr(config, dest, None) is not None for dest in FLAGS.values())

    @classmethod
    def check_config(cls, config) -> None:
        from mtil import registry

        given = ", ".join(f"--{dest.replace('_', '-')}" for dest in FLAGS.values()
                          if getattr(config, dest) is not None)
        method = registry.method_class(config.method)
        if config.train_mode == "fc" or method.trains_instead_of_clip or method.training_free:
            why = ("--train-mode fc trains only a linear head" if config.train_mode == "fc" else
                   f"--method {config.method} trains {'nothing' if method.training_free else 'its own modules'}")
            raise UserError(f"{given} set learning rates of CLIP's weights, but {why} and no CLIP weight trains: "
                            f"drop {given}")
        if config.lr_multipliers:
            raise UserError(f"--lr-multipliers and {given} both set per-part learning rates: give one of them")

    def check_model(self, model) -> None:
        """A multiplier for a part of which nothing trains (train mode, --freeze) would do nothing."""
        parts = {clip_part(n) for n in trainable_names(model, self.config.train_mode, self.config.freeze)}
        idle = [f"--lr-mult-{part}" for part, dest in FLAGS.items()
                if getattr(self.config, dest) is not None and part not in parts]
        if idle:
            raise UserError(f"{', '.join(idle)}: --train-mode {self.config.train_mode}"
                            f"{' with --freeze' if self.config.freeze else ''} trains no parameter of that part, "
                            f"so the multiplier would do nothing: drop it")

    def parameter_groups(self, run, task, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = {id(p): n for n, p in run.model.named_parameters()}
        return split_groups(groups, names, task.settings.lr, multipliers_of(self.config))
