"""``--precision``: the arithmetic of forward passes (autocast), with a gradient scaler for fp16.

Weights stay float32 (autocast only changes the dtype of the matmuls and convolutions it covers), losses are
summed in float32, and weight averages (WE, EMA, WiSE) work on the float32 weights. ``auto`` is bf16 on a GPU that
supports it (Ampere and newer), else fp32; on the CPU always fp32 (bf16 there is slower on most CPUs and meant for
tests). On CUDA, float32 matmuls use TF32 unless ``--deterministic``.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a bf16-capable GPU, fp32 elsewhere; explicit names stay."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its small exponent range underflows gradients); bf16 and fp32 do not."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def set_determinism(deterministic: bool) -> None:
    """--deterministic: bitwise-reproducible kernels (cuBLAS needs its workspace setting for that)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def configure_matmul(device: torch.device, deterministic: bool) -> None:
    """TF32 for float32 matmuls on CUDA (Ampere+), unless bitwise reproducibility was asked for."""
    if device.type == "cuda":
        allow = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
