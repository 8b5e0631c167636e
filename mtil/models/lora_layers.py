"""The peft-dependent half of :mod:`mtil.models.lora` (imported only when LoRA is used: ``import peft`` loads
transformers, seconds of start-up): separate q/k/v adapters on the packed ``in_proj``, a selectable subset of the
q, k, v, o adapters, and an exact forward for peft's LoRA ``MultiheadAttention``. See :mod:`mtil.models.lora` for the
design."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.layer import MultiheadAttention as PeftLoraMultiheadAttention

from mtil.models.lora import ATTENTION_PARTS

QKV = ATTENTION_PARTS[:3]  # the thirds of the packed in_proj, in row order


class _QKVAdapterHalf(nn.Module):
    """One half (``A`` or ``B``) of the packed in_proj adapter: a Parameter per adapted part, named ``q``, ``k``,
    ``v``. A part that is not adapted has no Parameter at all (see :meth:`drop`)."""

    @property
    def parts(self) -> tuple[str, ...]:
        """The adapted parts, in q, k, v order (read from the registered Parameters, so sharing keeps it right)."""
        return tuple(p for p in QKV if p in self._parameters)

    def drop(self, part: str) -> None:
        """Remove a part's Parameter: that part is no longer adapted (contributes exactly zero)."""
        if part in self._parameters:
            delattr(self, part)

    def _blocks(self, shape: tuple[int, int]) -> list[torch.Tensor]:
        """The q, k, v blocks, zeros (of ``shape``) in place of parts that are not adapted."""
        present = [self._parameters[p] for p in self.parts]
        if not present:
            raise RuntimeError("this in_proj adapter adapts none of q, k, v: it has no weight")
        like = present[0]
        return [self._parameters[p] if p in self._parameters else like.new_zeros(shape) for p in QKV]


class QKVLoraA(_QKVAdapterHalf):
    """``lora_A`` of the packed in_proj as three adapters: ``weight = cat(A_q, A_k, A_v)`` (``3r x D``)."""

    def __init__(self, in_features: int, r: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.r = in_features, r
        for part in QKV:
            weight = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # peft's default initialisation of A
            setattr(self, part, weight)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(self._blocks((self.r, self.in_features)), dim=0)


class QKVLoraB(_QKVAdapterHalf):
    """``lora_B`` of the packed in_proj: ``weight = block_diag(B_q, B_k, B_v)`` (``3D x 3r``), zero at start."""

    def __init__(self, r: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.out_features, self.r = out_features, r
        for part in QKV:
            setattr(self, part, nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype)))

    @property
    def weight(self) -> torch.Tensor:
        return torch.block_diag(*self._blocks((self.out_features, self.r)))


class LoraMultiheadAttention(PeftLoraMultiheadAttention):
    """peft's LoRA ``MultiheadAttention`` with separate q/k/v adapters, any subset of the q, k, v, o adapters
    (:meth:`keep_parts`) and an exact, non-mutating forward.

    The o adapter is peft's LoRA ``Linear`` around ``out_proj``; when o is not adapted ``out_proj`` is the plain
    ``nn.Linear`` again. A q, k or v adapter that is not adapted has no Parameter (its rows of ``in_proj_weight``
    are used as they are)."""

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        base = self.get_base_layer()
        weight = base.in_proj_weight
        embed = base.embed_dim
        self.lora_A[adapter_name] = QKVLoraA(embed, r, device=weight.device, dtype=weight.dtype)
        self.lora_B[adapter_name] = QKVLoraB(r, embed, device=weight.device, dtype=weight.dtype)

    # ------------------------------------------------------------------------------------------ parts
    def out_lora(self) -> LoraLayer | None:
        """peft's LoRA ``Linear`` around ``out_proj`` (the o adapter), or None when o is not adapted."""
        out = self.get_base_layer().out_proj
        return out if isinstance(out, LoraLayer) else None

    @property
    def out_proj(self) -> nn.Module:
        """The plain ``out_proj`` Linear (peft's property assumes it is always wrapped)."""
        out = self.get_base_layer().out_proj
        return out.get_base_layer() if isinstance(out, LoraLayer) else out

    def adapted_parts(self, adapter: str) -> tuple[str, ...]:
        """The parts (of q, k, v, o) that ``adapter`` adapts, in that order."""
        parts = list(self.lora_A[adapter].parts) if adapter in self.lora_A else []
        out = self.out_lora()
        if out is not None and adapter in out.lora_A:
            parts.append("o")
        return tuple(parts)

    def keep_parts(self, adapter: str, parts: Iterable[str]) -> None:
        """Adapt only ``parts`` (a non-empty subset of q, k, v, o) with ``adapter``: the other parts' adapters are
        removed (no Parameter left, exactly zero contribution). Right after injection, before any sharing."""
        keep = set(parts)
        if not keep or not keep <= set(ATTENTION_PARTS):
            raise ValueError(f"attention parts must be a non-empty subset of q, k, v, o, got {sorted(keep)}")
        for part in QKV:
            if part not in keep:
                self.lora_A[adapter].drop(part)
                self.lora_B[adapter].drop(part)
        out = self.out_lora()
        if "o" not in keep and out is not None and adapter in out.lora_A:
            if set(out.lora_A) != {adapter}:
                raise NotImplementedError("dropping the o adapter of one of several adapters is not supported")
            self.get_base_layer().out_proj = out.get_base_layer()

    # ------------------------------------------------------------------------------------------ weights
    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lora_A]

    def in_proj_deltas(self, adapters: Iterable[str]) -> dict[str, torch.Tensor]:
        """part -> ``sum over adapters (alpha / r) B_part A_part`` (``D x D``), for the adapted q/k/v parts only."""
        deltas: dict[str, torch.Tensor] = {}
        for adapter in adapters:
            lora_a, lora_b, scaling = self.lora_A[adapter], self.lora_B[adapter], self.scaling[adapter]
            for part in lora_a.parts:
                delta = (getattr(lora_b, part) @ getattr(lora_a, part)) * scaling
                deltas[part] = delta if part not in deltas else deltas[part] + delta
        return deltas

    def out_proj_delta(self, adapters: Iterable[str]) -> torch.Tensor | None:
        """``sum over adapters (alpha / r) B_o A_o``, or None when o is not adapted."""
        out = self.out_lora()
        if out is None:
            return None
        deltas = [out.get_delta_weight(a) for a in adapters if a in out.lora_A]
        return sum(deltas[1:], deltas[0]) if deltas else None

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """The packed ``3D x D`` update of ``in_proj_weight`` (zero rows for parts that are not adapted)."""
        weight = self.get_base_layer().in_proj_weight
        deltas = self.in_proj_deltas([adapter])
        embed = self.get_base_layer().embed_dim
        return torch.cat([deltas[p] if p in deltas else weight.new_zeros(embed, embed) for p in QKV]).to(weight)

    def _merged_in_proj(self, weight: torch.Tensor, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """``in_proj_weight`` with each adapted third plus its update; the other thirds are the base rows as they are
        (not ``+ 0``)."""
        thirds = weight.chunk(3, dim=0)
        return torch.cat([w + deltas[p].to(w.dtype) if p in deltas else w for p, w in zip(QKV, thirds)], dim=0)

    @torch.no_grad()
    def merge_into_base(self) -> nn.MultiheadAttention:
        """Add the active adapters' updates into the base weights (in place: only the adapted thirds of
        ``in_proj_weight``, and ``out_proj.weight`` only when o is adapted) and return the plain
        ``nn.MultiheadAttention`` with its plain ``out_proj``."""
        base = self.get_base_layer()
        adapters = self._active()
        deltas = self.in_proj_deltas(adapters)
        for part, third in zip(QKV, base.in_proj_weight.chunk(3, dim=0)):
            if part in deltas:
                third.add_(deltas[part].to(third.dtype))
        out_delta = self.out_proj_delta(adapters)
        out_base = self.out_proj
        if out_delta is not None:
            out_base.weight.add_(out_delta.to(out_base.weight.dtype))
        base.out_proj = out_base
        return base

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        # peft's merge replaces the base Parameters by plain tensors and assumes a wrapped out_proj.
        raise NotImplementedError("merge LoRA adapters with mtil.models.lora.merge_lora")

    def _restore_weights(self) -> None:
        base = self.get_base_layer()
        if "in_proj_weight" in base._parameters and "weight" in self.out_proj._parameters:
            return  # our forward never unregisters them: nothing to restore (peft's would re-create the Parameters)
        super()._restore_weights()

    def forward(self, query: torch.Tensor, *args, **kwargs):
        if self.disable_adapters or self.merged:
            return super().forward(query, *args, **kwargs)
        self._check_forward_args(query, *args, **kwargs)
        base = self.get_base_layer()
        adapters = self._active()
        # An instance attribute shadows the registered Parameter for this one call (nn.MultiheadAttention reads
        # self.in_proj_weight and self.out_proj.weight); the Parameters themselves stay registered and untouched.
        shadows: list[tuple[nn.Module, str, torch.Tensor]] = []
        deltas = self.in_proj_deltas(adapters)
        if deltas:
            shadows.append((base, "in_proj_weight", self._merged_in_proj(base.in_proj_weight, deltas)))
        out_delta = self.out_proj_delta(adapters)
        if out_delta is not None:
            out_base = self.out_proj
            shadows.append((out_base, "weight", out_base.weight + out_delta.to(out_base.weight.dtype)))
        for owner, name, value in shadows:
            object.__setattr__(owner, name, value)
        try:
            return base(query, *args, **kwargs)
        finally:
            for owner, name, _ in shadows:
                del owner.__dict__[name]
