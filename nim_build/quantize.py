"""FP8 quantization exactly as nvidia-modelopt's TensorRT-LLM exporter does it.

A scale is a dequantization multiplier, ``W ~= W_fp8 * scale`` with ``scale = amax / 448`` in float32, and the
weight is divided in float32 before the cast (modelopt's ``to_quantized_weight``): the same bytes as the official
exporter. Dividing in bf16 would leave ~3% of the elements one FP8 step off.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
QUANT_ALGOS = {"fp8": "FP8", "fp8-pc-pt": "FP8_PER_CHANNEL_PER_TOKEN", "bf16": None, "fp16": None}


def amax(t: torch.Tensor) -> torch.Tensor:
    """Per-tensor absolute maximum as a float32 scalar tensor (exact: the max of bf16 values is a bf16 value)."""
    return t.abs().amax().float()


def scale_from_amax(a: torch.Tensor) -> torch.Tensor:
    """Dequantization scale [1] float32; amax clamped to the smallest normal float like modelopt's export_amax."""
    a = a.float().clamp(min=torch.finfo(torch.float32).tiny)
    return (a / FP8_MAX).reshape(-1)


def quantize_per_tensor(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w.float() / scale.float()).to(torch.float8_e4m3fn)


def per_channel_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel dequantization scales [out] float32 (FP8_PER_CHANNEL_PER_TOKEN)."""
    a = w.abs().amax(dim=1).float().clamp(min=torch.finfo(torch.float32).tiny)
    return a / FP8_MAX


def quantize_per_channel(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (w.float() / scales.float()[:, None]).to(torch.float8_e4m3fn)


def dequantize(w_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weights back from FP8 and a per-tensor [1] or per-channel [out] scale."""
    s = scale.float()
    return w_fp8.float() * (s[:, None] if s.numel() > 1 else s)
