"""Rotary position embedding, GPT-NeoX style (rotate halves), with linear and llama3 frequency scaling."""

from __future__ import annotations

import math

import torch


def inv_freq(head_size: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies [head_size / 2], float32, as transformers computes them."""
    inv = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        inv = _llama3(inv, scaling)
    return inv


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos, sin by position, computed one fixed block of positions at a time and kept: a position's values then
    never depend on which other positions a step holds (elementwise kernels take a scalar path for the tail of a
    tensor, so the same position computed in tensors of different lengths can differ in the last bit)."""

    BLOCK = 1024

    def __init__(self, inv: torch.Tensor, dtype: torch.dtype, device: torch.device):
        self.inv, self.dtype, self.device = inv, dtype, device
        self.cos = self.sin = torch.empty(0, 1, 2 * len(inv), dtype=dtype, device=device)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_size] for positions [T], sin's first half negated (what `apply` takes)."""
        have, need = len(self.cos), int(positions.max()) + 1
        if need > have:
            blocks = [
                cos_sin(torch.arange(b, b + self.BLOCK), self.inv, self.dtype) for b in range(have, need, self.BLOCK)
            ]
            self.cos = torch.cat([self.cos] + [c.to(self.device) for c, _ in blocks])
            self.sin = torch.cat([self.sin] + [_negate_first_half(s).to(self.device) for _, s in blocks])
        positions = positions.to(self.device)
        return self.cos[positions], self.sin[positions]


def cos_sin(positions: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, head_size] for positions [T] (computed in float32, then cast)."""
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _negate_first_half(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_size] rotated: x * cos + [-x2, x1] * sin, computed as x * cos + [x2, x1] * [-sin1, sin2]
    (the same bits: a sign moves exactly) in three ops instead of five."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin
