"""FP8 (E4M3) numerics: dequantization, activation fake-quantization, and the native FP8 GEMM on CUDA.

What TensorRT-LLM computes for an FP8 linear (per-tensor recipe): x_fp8 = saturate(x / s_act),
y = (x_fp8 @ W_fp8.T) * (s_act * s_w) accumulated in float32. On CPU in float32 the same function is
fake_quant(x, s_act) @ (W_fp8 * s_w).T: identical up to the summation order; in bf16 it is
x_fp8 @ (W_fp8 * s_w * s_act).T (runtime/linear.py). With
FP8_PER_CHANNEL_PER_TOKEN the activation scale is computed per token (amax / 448) at run time.
"""

from __future__ import annotations

import torch

from nim_build.runtime.checkpoint import FP8

FP8_MAX = 448.0
# The 256 E4M3 values, exact in each of these dtypes: on CPU a table lookup converts FP8 2-5x faster than the cast.
_FP8_TABLES = {dt: torch.arange(256, dtype=torch.uint8).view(FP8).to(dt) for dt in (torch.float32, torch.bfloat16)}


def values(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The E4M3 values of q in `dtype` (float32 or bf16: exact)."""
    if q.device.type == "cpu":
        return torch.take(_FP8_TABLES[dtype], q.view(torch.uint8).long())
    return q.to(dtype)


def dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_fp8 * scale in `dtype` (scale broadcastable to W)."""
    return (values(w, torch.float32) * scale.to(w.device)).to(dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Saturating cast of x / scale to E4M3 (the cast alone turns out-of-range values into NaN)."""
    # One op where x.float() / scale is two, the same bits: a float32 scale of one dimension or more promotes x.
    return torch.div(x, scale if scale.dim() else scale.reshape(1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round x to the FP8 grid of `scale` and back (same dtype as x)."""
    return (values(quantize(x, scale), torch.float32) * scale).to(x.dtype)


def per_token_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token activation scale, [tokens, 1]."""
    return (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)


def native_fp8_available(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs: CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_ok(lin) -> bool:
    out_f, in_f = lin.weight.shape
    # per-tensor or per-output-row scales (a per-input-column scale is not a GEMM scale); FP8 GEMM dims % 16
    w_ok = lin.w_scale.shape[1] == 1 and out_f % 16 == 0 and in_f % 16 == 0
    a_ok = lin.per_token or (lin.a_scale is not None and lin.a_scale.numel() == 1 and lin.w_scale.numel() == 1)
    return w_ok and a_ok


def scaled_mm_linear(x: torch.Tensor, lin, dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm with the checkpoint's scales: per-tensor (FP8) or row-wise (FP8_PER_CHANNEL_PER_TOKEN)."""
    t = x.shape[0]
    pad = (-t) % 16  # FP8 GEMM operands need dimensions divisible by 16
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    if lin.per_token:
        a_scale = per_token_scale(x)  # [M, 1]
        b_scale = lin.w_scale.to(x.device).reshape(1, -1).expand(1, lin.weight.shape[0]).contiguous()  # [1, N]
        out_dtype = torch.bfloat16  # row-wise scaling requires a bf16 output
    else:
        a_scale = lin.a_scale.to(x.device).reshape(())
        b_scale = lin.w_scale.to(x.device).reshape(())
        out_dtype = dtype
    y = torch._scaled_mm(quantize(x, a_scale), lin.weight.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)
    return y[:t].to(dtype)
