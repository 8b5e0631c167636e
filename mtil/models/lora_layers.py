"""The peft-dependent half of :mod:`mtil.models.lora` (imported only when LoRA is used: ``import peft`` loads
transformers, seconds of start-up): separate q/k/v adapters on the packed ``in_proj`` and an exact forward for
peft's LoRA ``MultiheadAttention``. See :mod:`mtil.models.lora` for the design."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from peft.tuners.lora.layer import MultiheadAttention as PeftLoraMultiheadAttention


class QKVLoraA(nn.Module):
    """``lora_A`` of the packed in_proj as three adapters: ``weight = cat(A_q, A_k, A_v)`` (``3r x D``)."""

    def __init__(self, in_features: int, r: int, device=None, dtype=None):
        super().__init__()
        for part in "qkv":
            weight = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # peft's default initialisation of A
            setattr(self, part, weight)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.q, self.k, self.v], dim=0)


class QKVLoraB(nn.Module):
    """``lora_B`` of the packed in_proj: ``weight = block_diag(B_q, B_k, B_v)`` (``3D x 3r``), zero at start."""

    def __init__(self, r: int, out_features: int, device=None, dtype=None):
        super().__init__()
        for part in "qkv":
            setattr(self, part, nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype)))

    @property
    def weight(self) -> torch.Tensor:
        return torch.block_diag(self.q, self.k, self.v)


class LoraMultiheadAttention(PeftLoraMultiheadAttention):
    """peft's LoRA ``MultiheadAttention`` with separate q/k/v adapters and an exact, non-mutating forward."""

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        base = self.get_base_layer()
        weight = base.in_proj_weight
        embed = base.embed_dim
        self.lora_A[adapter_name] = QKVLoraA(embed, r, device=weight.device, dtype=weight.dtype)
        self.lora_B[adapter_name] = QKVLoraB(r, embed, device=weight.device, dtype=weight.dtype)

    def _restore_weights(self) -> None:
        base = self.get_base_layer()
        if "in_proj_weight" in base._parameters and "weight" in base.out_proj.get_base_layer()._parameters:
            return  # our forward never unregisters them: nothing to restore (peft's would re-create the Parameters)
        super()._restore_weights()

    def forward(self, query: torch.Tensor, *args, **kwargs):
        if self.disable_adapters or self.merged:
            return super().forward(query, *args, **kwargs)
        self._check_forward_args(query, *args, **kwargs)
        base = self.get_base_layer()
        out_lora = base.out_proj
        out_base = out_lora.get_base_layer()
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if not adapters:
            return base(query, *args, **kwargs)
        w_in, w_out = base.in_proj_weight, out_base.weight
        merged_in = w_in + sum(self.get_delta_weight(a) for a in adapters).to(w_in.dtype)
        merged_out = w_out + sum(out_lora.get_delta_weight(a) for a in adapters).to(w_out.dtype)
        # An instance attribute shadows the registered Parameter for this one call (nn.MultiheadAttention reads
        # self.in_proj_weight and self.out_proj.weight); the Parameters themselves stay registered and untouched.
        object.__setattr__(base, "in_proj_weight", merged_in)
        object.__setattr__(out_base, "weight", merged_out)
        try:
            return base(query, *args, **kwargs)
        finally:
            del base.__dict__["in_proj_weight"]
            del out_base.__dict__["weight"]
