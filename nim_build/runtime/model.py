"""The llama/mistral decoder over a ragged batch (sequences packed without padding) with an optional paged KV cache.

One forward pass serves every phase: a prefill chunk is `length` tokens starting at `start` (the number of tokens
already in the cache), a decode step is a chunk of length 1. The linear layers run once over all tokens of all
sequences (the shared work batching pays for); attention loops over sequences and gathers each one's K/V from
its cache blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nim_build.runtime import fp8, rope
from nim_build.runtime.checkpoint import Checkpoint, Layer, Linear, load_checkpoint
from nim_build.runtime.kv_cache import PagedKVCache


@dataclass
class SeqChunk:
    start: int  # tokens of this sequence already in the cache (position of the chunk's first token)
    length: int  # tokens in this chunk
    block_table: list[int] | None = None  # the sequence's cache blocks; None without a cache (start must be 0)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # float32 [num_chunks, vocab] (last token of each chunk) or [tokens, vocab] with all_logits
    hidden_states: list[torch.Tensor] | None = None  # embeddings, each layer's output, final-normed last layer


class DecoderModel:
    def __init__(self, ckpt: Checkpoint, *, device: str | torch.device = "cpu", compute_dtype: torch.dtype | None = None,
                 fake_quant_activations: bool | None = None):
        """compute_dtype: float32 on CPU by default (CPU half-precision GEMMs are no faster here and less exact),
        the checkpoint dtype on CUDA. fake_quant_activations (FP8 checkpoints; default on): round each FP8 linear's
        input to the FP8 grid of its activation scale, as TensorRT-LLM does before its FP8 GEMM."""
        self.cfg = c = ckpt.config
        self.device = torch.device(device)
        self.dtype = compute_dtype or (c.dtype if self.device.type == "cuda" else torch.float32)
        self.fake_quant = c.quant_algo is not None if fake_quant_activations is None else fake_quant_activations
        self.native_fp8 = fp8.native_fp8_available(self.device)
        self.kv_fp8 = c.kv_cache_quant_algo == "FP8"
        self.embedding = self._t(ckpt.embedding)
        self.layers = [self._layer(layer) for layer in ckpt.layers]
        self.ln_f = self._t(ckpt.ln_f)
        self.lm_head = Linear(self.embedding) if ckpt.lm_head.weight is ckpt.embedding else self._lin(ckpt.lm_head)
        self.inv_freq = rope.inv_freq(c.head_size, c.rotary_base, c.rotary_scaling).to(self.device)
        self.scale = 1.0 / math.sqrt(c.head_size)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, **kw) -> "DecoderModel":
        return cls(load_checkpoint(ckpt_dir), **kw)

    def _t(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

    def _lin(self, lin: Linear) -> Linear:
        if not lin.is_fp8:
            return Linear(self._t(lin.weight))
        mv = (lambda s: None if s is None else s.to(self.device))
        return Linear(lin.weight.to(self.device), mv(lin.w_scale), mv(lin.a_scale), lin.per_token)

    def _layer(self, layer: Layer) -> Layer:
        return Layer(self._t(layer.input_layernorm), self._lin(layer.qkv), self._lin(layer.dense),
                     self._t(layer.post_layernorm), self._lin(layer.fc), self._lin(layer.gate), self._lin(layer.proj),
                     None if layer.kv_scale is None else layer.kv_scale.to(self.device))

    def kv_scales(self) -> list[torch.Tensor] | None:
        """Per-layer FP8 KV-cache scales when the checkpoint quantizes the KV cache."""
        if not self.kv_fp8:
            return None
        return [layer.kv_scale if layer.kv_scale is not None else torch.ones(1, device=self.device)
                for layer in self.layers]

    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        return fp8.linear(x, lin, self.dtype, self.fake_quant, self.native_fp8)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.norm_epsilon)
        return weight * xf.to(self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, chunks: list[SeqChunk], cache: PagedKVCache | None = None, *,
                all_logits: bool = False, output_hidden_states: bool = False) -> ForwardOutput:
        """input_ids [T]: the chunks' tokens packed back to back (sum of lengths == T)."""
        c = self.cfg
        positions = torch.cat([torch.arange(ch.start, ch.start + ch.length) for ch in chunks]).to(self.device)
        cos, sin = rope.cos_sin(positions, self.inv_freq, self.dtype)
        slots = self._slots(chunks, cache)
        x = self.embedding[input_ids.to(self.device)]
        hidden = [x] if output_hidden_states else None
        nq, nkv = c.num_heads * c.head_size, c.num_kv_heads * c.head_size
        for i, layer in enumerate(self.layers):
            qkv = self.linear(self.rmsnorm(x, layer.input_layernorm), layer.qkv)
            q = rope.apply(qkv[:, :nq].reshape(-1, c.num_heads, c.head_size), cos, sin)
            k = rope.apply(qkv[:, nq:nq + nkv].reshape(-1, c.num_kv_heads, c.head_size), cos, sin)
            v = qkv[:, nq + nkv:].reshape(-1, c.num_kv_heads, c.head_size)
            attn = self._attention(i, q, k, v, chunks, cache, slots)
            x = x + self.linear(attn, layer.dense)
            h = self.rmsnorm(x, layer.post_layernorm)
            x = x + self.linear(F.silu(self.linear(h, layer.fc)) * self.linear(h, layer.gate), layer.proj)
            if output_hidden_states and i < len(self.layers) - 1:
                hidden.append(x)
        x = self.rmsnorm(x, self.ln_f)
        if output_hidden_states:
            hidden.append(x)
        if not all_logits:
            last = torch.tensor([ch.length for ch in chunks]).cumsum(0) - 1
            x = x[last.to(self.device)]
        logits = self.linear(x, self.lm_head).float()
        return ForwardOutput(logits, hidden)

    def _slots(self, chunks, cache) -> dict | None:
        """Cache slots for this step, computed once for all layers: `write` [T] (every new token), per prefill
        chunk the slots of positions 0..start+length, and for the decode chunks (length 1) one padded
        [B, S_max] slot matrix with its validity mask, so their attention runs as one batched product."""
        if cache is None:
            if any(ch.start for ch in chunks):
                raise ValueError("a chunk that continues a sequence (start > 0) needs a KV cache")
            return None
        reads = [cache.slots(ch.block_table, 0, ch.start + ch.length, self.device) for ch in chunks]
        out = {"write": torch.cat([r[ch.start:] for r, ch in zip(reads, chunks)]), "prefill": {}}
        decode = [j for j, ch in enumerate(chunks) if ch.length == 1]
        for j, ch in enumerate(chunks):
            if ch.length > 1:
                out["prefill"][j] = reads[j]
        if decode:
            width = max(len(reads[j]) for j in decode)
            out["decode_idx"] = decode
            out["decode_slots"] = torch.stack([F.pad(reads[j], (0, width - len(reads[j]))) for j in decode])
            lengths = torch.tensor([len(reads[j]) for j in decode], device=self.device)
            out["decode_mask"] = torch.arange(width, device=self.device)[None, :] < lengths[:, None]
        return out

    def _attention(self, layer, q, k, v, chunks, cache, slots) -> torch.Tensor:
        """q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads * D]."""
        kv_scale = self.layers[layer].kv_scale if self.kv_fp8 else None
        if cache is not None:
            cache.write(layer, slots["write"], k, v)
        elif kv_scale is not None:  # what an FP8 cache would hand back
            k, v = fp8.fake_quant(k, kv_scale), fp8.fake_quant(v, kv_scale)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        offsets = torch.tensor([0] + [ch.length for ch in chunks]).cumsum(0).tolist()
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        for j, ch in enumerate(chunks):
            if cache is not None and ch.length == 1:
                continue  # batched below
            lo, hi = offsets[j], offsets[j + 1]
            if cache is not None:
                ks, vs = cache.read(layer, slots["prefill"][j])
            else:
                ks, vs = k[lo:hi], v[lo:hi]
            ks = ks.transpose(0, 1).repeat_interleave(groups, 0)  # [heads, S, D]
            vs = vs.transpose(0, 1).repeat_interleave(groups, 0)
            mask = None
            if ch.length > 1:  # query i (position start+i) sees keys 0..start+i
                s = ch.start + ch.length
                mask = (torch.arange(s, device=self.device)[None, :]
                        <= (ch.start + torch.arange(ch.length, device=self.device))[:, None])
            o = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), ks, vs, attn_mask=mask, scale=self.scale)
            out[lo:hi] = o.transpose(0, 1).reshape(ch.length, -1)
        if cache is not None and "decode_idx" in slots:
            rows = torch.tensor([offsets[j] for j in slots["decode_idx"]], device=self.device)
            out[rows] = self._decode_attention(layer, q[rows], cache, slots["decode_slots"], slots["decode_mask"])
        return out

    def _decode_attention(self, layer, q, cache, slot_matrix, valid) -> torch.Tensor:
        """One query per sequence against its cached keys, all sequences in one batched product.
        q [B, heads, D]; slot_matrix, valid [B, S_max] -> [B, heads * D]."""
        c = self.cfg
        b, width = slot_matrix.shape
        ks, vs = cache.read(layer, slot_matrix.reshape(-1))
        ks = ks.reshape(b, width, c.num_kv_heads, c.head_size).transpose(1, 2)  # [B, kv_heads, S, D]
        vs = vs.reshape(b, width, c.num_kv_heads, c.head_size).transpose(1, 2)
        qg = q.reshape(b, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_size)  # q head = kv head * g + i
        scores = (qg @ ks.transpose(-1, -2)) * self.scale  # [B, kv_heads, g, S]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        return (scores.float().softmax(-1).to(vs.dtype) @ vs).reshape(b, -1)
