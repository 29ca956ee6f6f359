"""The llama/mistral decoder over a ragged batch (sequences packed without padding) with an optional paged KV cache.

One forward pass serves every phase: a prefill chunk is `length` tokens starting at `start` (the number of tokens
already in the cache), a decode step is a chunk of length 1. The linear layers run once over all tokens of all
sequences (the shared work batching pays for); attention runs tile by tile: prefill tiles per sequence, decode
tokens of all sequences together.

Batch invariance: a sequence's logits are the same bits whatever else shares its steps, so in-flight batching
changes no result (greedy text served under load equals the text generated alone). Three things make it so: GEMMs
over a KV cache run in calls of row counts this CPU computes a row the same way in (measured, runtime/linear.py),
rotary tables are computed once per fixed block of positions, and attention is cut into tiles at fixed positions
(see `_attention`); the scheduler cuts prefill chunks at the same multiples.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nim_build import COMPUTE_DTYPE_ENV, COMPUTE_DTYPES, limits
from nim_build.errors import UserError
from nim_build.runtime import fp8, rope
from nim_build.runtime.checkpoint import Checkpoint, Layer, Linear, load_checkpoint
from nim_build.runtime.kv_cache import PagedKVCache
from nim_build.runtime.linear import PreparedLinear, fuse_outputs, native_bf16_cpu
from nim_build.runtime.threads import on_own_thread

# What DecoderModel computes in on CPU unless told otherwise: the exact mode the accuracy gate and the correctness
# tests use. Serving picks bf16 where the CPU multiplies it natively (`serving_compute_dtype`). The chart sizes a CPU
# pod's KV-cache memory with this one, the larger.
CPU_COMPUTE_DTYPE = torch.float32
# FP8 weights are dequantized at load (never per step) when the dequantized copy takes at most this share of the
# memory this process may still use; else they stay FP8, dequantized on every call (slow, but it fits).
DEQUANTIZE_AT_LOAD_MAX_SHARE = 0.5
ATTENTION_TILE = 32  # query tile without a KV cache (with one, the cache block size)


def serving_compute_dtype(device: torch.device | str) -> torch.dtype | None:
    """What an engine serves in: $NIM_BUILD_COMPUTE_DTYPE if set; else on CPU bf16 where the CPU multiplies it
    natively (measured 2.3x faster than float32 per decode step on the embedded model), float32 elsewhere; None
    (DecoderModel's default, the checkpoint's dtype) on CUDA."""
    name = os.environ.get(COMPUTE_DTYPE_ENV, "auto")
    if name not in COMPUTE_DTYPES:
        raise UserError(f"{COMPUTE_DTYPE_ENV}={name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cpu":
        return torch.bfloat16 if native_bf16_cpu() else CPU_COMPUTE_DTYPE
    return None


@dataclass
class SeqChunk:
    start: int  # tokens of this sequence already in the cache (position of the chunk's first token)
    length: int  # tokens in this chunk
    block_table: list[int] | None = None  # the sequence's cache blocks; None without a cache (start must be 0)


def _one_query_tail(ch: SeqChunk, tile: int) -> bool:
    """Whether the chunk's last tile holds one query (a decode token, or a prefill chunk that ends one token past a
    tile boundary): with a cache, those of all sequences attend together."""
    return ch.length == 1 or (ch.start + ch.length - 1) % tile == 0


@dataclass
class PreparedLayer:
    input_layernorm: torch.Tensor
    qkv: PreparedLinear
    dense: PreparedLinear
    post_layernorm: torch.Tensor
    fc: PreparedLinear  # HF gate_proj, the SiLU branch; with gate None, gate_proj and up_proj side by side
    gate: PreparedLinear | None  # HF up_proj, when it cannot share fc's GEMM
    proj: PreparedLinear
    kv_scale: torch.Tensor | None


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # float32 [num_chunks, vocab] (last token of each chunk) or [tokens, vocab] with all_logits
    hidden_states: list[torch.Tensor] | None = None  # embeddings, each layer's output, final-normed last layer


class DecoderModel:
    def __init__(
        self,
        ckpt: Checkpoint,
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype | None = None,
        fake_quant_activations: bool | None = None,
    ):
        """compute_dtype: float32 on CPU by default (CPU half-precision GEMMs are no faster here and less exact),
        the checkpoint dtype on CUDA. fake_quant_activations (FP8 checkpoints; default on): round each FP8 linear's
        input to the FP8 grid of its activation scale, as TensorRT-LLM does before its FP8 GEMM."""
        self.cfg = c = ckpt.config
        self.device = torch.device(device)
        self.dtype = compute_dtype or (c.dtype if self.device.type == "cuda" else CPU_COMPUTE_DTYPE)
        # Attention's products and softmax: float32 on CPU whatever the GEMMs compute in (the tiny products of
        # decode attention run 4x faster in float32 there than in bf16); the keys and values read are cast.
        self.attn_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.fake_quant = c.quant_algo is not None if fake_quant_activations is None else fake_quant_activations
        self.native_fp8 = fp8.native_fp8_available(self.device)
        self.kv_fp8 = c.kv_cache_quant_algo == "FP8"
        self.dequantize_fp8 = self._dequantize_at_load(ckpt)
        self.embedding = self._t(ckpt.embedding)
        self.layers = [self._layer(layer) for layer in ckpt.layers]
        self.ln_f = self._t(ckpt.ln_f)
        tied = ckpt.lm_head.weight is ckpt.embedding
        self.lm_head = self._lin(Linear(self.embedding) if tied else ckpt.lm_head)
        self.rotary = rope.RotaryTable(
            rope.inv_freq(c.head_size, c.rotary_base, c.rotary_scaling), self.dtype, self.device
        )
        self.scale = 1.0 / math.sqrt(c.head_size)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, **kw) -> DecoderModel:
        limits.configure_torch_threads()  # before the first parallel op: the container's CPUs, not the node's
        # On a thread of its own, so that the caller's thread starts no OpenMP team (see runtime/threads.py).
        return on_own_thread(lambda: cls(load_checkpoint(ckpt_dir), **kw))

    def _t(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

    def _dequantize_at_load(self, ckpt: Checkpoint) -> bool:
        if self.device.type != "cpu":  # CUDA: the native FP8 GEMM, or a dequantization that costs little there
            return False
        fp8_linears = [
            lin for layer in ckpt.layers for lin in (layer.qkv, layer.dense, layer.fc, layer.gate, layer.proj)
        ]
        need = sum(lin.weight.numel() for lin in fp8_linears if lin.is_fp8) * self.dtype.itemsize
        return need <= DEQUANTIZE_AT_LOAD_MAX_SHARE * limits.memory().available

    def _lin(self, lin: Linear) -> PreparedLinear:
        return PreparedLinear.prepare(
            lin, self.device, self.dtype, dequantize=self.dequantize_fp8, fake_quant=self.fake_quant
        )

    def _layer(self, layer: Layer) -> PreparedLayer:
        fc_gate = fuse_outputs(layer.fc, layer.gate)  # one GEMM instead of two: the same bits, less overhead
        return PreparedLayer(
            self._t(layer.input_layernorm),
            self._lin(layer.qkv),
            self._lin(layer.dense),
            self._t(layer.post_layernorm),
            self._lin(fc_gate or layer.fc),
            None if fc_gate else self._lin(layer.gate),
            self._lin(layer.proj),
            None if layer.kv_scale is None else layer.kv_scale.to(self.device),
        )

    def kv_scales(self) -> list[torch.Tensor] | None:
        """Per-layer FP8 KV-cache scales when the checkpoint quantizes the KV cache."""
        if not self.kv_fp8:
            return None
        return [
            layer.kv_scale if layer.kv_scale is not None else torch.ones(1, device=self.device) for layer in self.layers
        ]

    def linear(self, x: torch.Tensor, lin: PreparedLinear, tiled: bool = False) -> torch.Tensor:
        return lin(x, self.dtype, self.native_fp8, tiled)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # in float32, as transformers' RMSNorm (F.rms_norm runs its mean-rsqrt-multiply: the same bits)
        return weight * F.rms_norm(x.float(), x.shape[-1:], None, self.cfg.norm_epsilon).to(self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        chunks: list[SeqChunk],
        cache: PagedKVCache | None = None,
        *,
        all_logits: bool = False,
        output_hidden_states: bool = False,
    ) -> ForwardOutput:
        """input_ids [T]: the chunks' tokens packed back to back (sum of lengths == T)."""
        c = self.cfg
        t = input_ids.numel()
        # A forward over a KV cache (serving: sequences that share steps) runs batch-invariant GEMMs on a CPU
        # (runtime/linear.py). Padded once to the row count the GEMMs need, not in every GEMM: rows are independent
        # everywhere but in attention, which reads the real rows only.
        tiled = cache is not None and self.device.type == "cpu"
        pad = self.layers[0].qkv.padded_rows(t, self.dtype, self.native_fp8, tiled) - t if self.layers else 0
        positions = torch.cat(
            [torch.arange(ch.start, ch.start + ch.length) for ch in chunks] + [torch.zeros(pad, dtype=torch.long)]
        )
        cos, sin = self.rotary(positions)
        slots = self._slots(chunks, cache)
        x = self.embedding[F.pad(input_ids, (0, pad)).to(self.device)]
        hidden = [x[:t]] if output_hidden_states else None
        nq, nkv = c.num_heads * c.head_size, c.num_kv_heads * c.head_size
        for i, layer in enumerate(self.layers):
            qkv = self.linear(self.rmsnorm(x, layer.input_layernorm), layer.qkv, tiled)
            # q and k rotated in one go: [T, heads + kv_heads, D]
            qk = rope.apply(qkv[:, : nq + nkv].view(-1, c.num_heads + c.num_kv_heads, c.head_size), cos, sin)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
            v = qkv[:, nq + nkv :].reshape(-1, c.num_kv_heads, c.head_size)
            attn = self._attention(i, q, k, v, chunks, cache, slots)
            x = x + self.linear(attn, layer.dense, tiled)
            h = self.rmsnorm(x, layer.post_layernorm)
            if layer.gate is None:
                fc, gate = self.linear(h, layer.fc, tiled).chunk(2, dim=-1)
            else:
                fc, gate = self.linear(h, layer.fc, tiled), self.linear(h, layer.gate, tiled)
            x = x + self.linear(F.silu(fc) * gate, layer.proj, tiled)
            if output_hidden_states and i < len(self.layers) - 1:
                hidden.append(x[:t])
        x = self.rmsnorm(x, self.ln_f)
        if output_hidden_states:
            hidden.append(x[:t])
        if all_logits:
            x = x[:t]
        else:
            last = torch.tensor([ch.length for ch in chunks]).cumsum(0) - 1
            x = x[last.to(self.device)]
        logits = self.linear(x, self.lm_head, tiled).float()
        return ForwardOutput(logits, hidden)

    def _slots(self, chunks, cache) -> dict | None:
        """What every layer's attention needs of the cache this step, computed once: `write` (where every new token
        goes), `read` (where positions 0..start+length are, of each chunk that has tiles of several queries, chunk
        after chunk) and `single` (the one-query tiles: see `_single_query_attention`)."""
        if cache is None:
            if any(ch.start for ch in chunks):
                raise ValueError("a chunk that continues a sequence (start > 0) needs a KV cache")
            return None
        tile = cache.block_size
        write, read, rows, tiles, row_of_tile, last_keys = [], [], [], [], [], []
        lo = 0
        for ch in chunks:
            end = ch.start + ch.length
            if ch.length > 1:  # every tile but a one-query last one attends below, to keys 0..end-1
                slots = cache.slots(ch.block_table, 0, end, self.device)
                read.append(slots)
                write.append(slots[ch.start :])
            else:  # a decode token: its own slot is all this step writes or reads by slot
                write.append(cache.slots(ch.block_table, ch.start, end, self.device))
            if _one_query_tail(ch, tile):  # position end - 1
                rows.append(lo + ch.length - 1)
                num_blocks = (end - 1) // tile + 1
                tiles += ch.block_table[:num_blocks]
                row_of_tile += [len(rows) - 1] * num_blocks
                last_keys += [tile] * (num_blocks - 1) + [(end - 1) % tile + 1]
            lo += ch.length
        single = None
        if rows:
            row_of_tile = torch.tensor(row_of_tile)
            num_tiles = row_of_tile.bincount()
            first = num_tiles.cumsum(0) - num_tiles
            max_tiles = int(num_tiles.max())
            single = {
                "rows": torch.tensor(rows, device=self.device),
                "blocks": torch.tensor(tiles, device=self.device),
                "row_of_tile": row_of_tile.to(self.device),
                # 0 for the keys a tile holds, -inf past the last one
                "bias": torch.zeros(len(tiles), 1, tile, dtype=self.attn_dtype)
                .masked_fill_((torch.arange(tile)[None, :] >= torch.tensor(last_keys)[:, None])[:, None, :], -math.inf)
                .to(self.device),
                # tile i's place in a [rows, max_tiles] grid
                "grid": (row_of_tile * max_tiles + torch.arange(len(tiles)) - first[row_of_tile]).to(self.device),
                # the grid before the tiles' parts go in: numerators and denominators 0, maxima -inf
                "empty": torch.zeros(
                    len(rows) * max_tiles, self.cfg.num_heads, self.cfg.head_size + 2, dtype=self.attn_dtype
                )
                .index_fill_(2, torch.tensor([self.cfg.head_size + 1]), -math.inf)
                .to(self.device),
                "max_tiles": max_tiles,
            }
        return {
            "write": cache.locate(torch.cat(write)),
            "read": cache.locate(torch.cat(read)) if read else None,
            "single": single,
        }

    def _attention(self, layer, q, k, v, chunks, cache, slots) -> torch.Tensor:
        """q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads * D].

        Batch invariant: each sequence's queries are cut into tiles at fixed multiples of `tile` positions (a
        decode token is a tile of its own), and a tile's result depends only on its sequence, never on what else
        shares the step (one product over sequences of different lengths would pad and re-block the sums, changing
        the last bits). Tiles of several queries attend in a call of their own; with a cache, the one-query tiles
        of all sequences (every decode token) attend together, block by block (`_single_query_attention`)."""
        kv_scale = self.layers[layer].kv_scale if self.kv_fp8 else None
        t = sum(ch.length for ch in chunks)  # q, k, v may have padding rows past these
        k, v = k[:t], v[:t]
        if cache is not None:
            cache.write(layer, slots["write"], k, v)
        elif kv_scale is not None:  # what an FP8 cache would hand back
            k, v = fp8.fake_quant(k, kv_scale), fp8.fake_quant(v, kv_scale)
        tile = cache.block_size if cache is not None else ATTENTION_TILE
        out = q.new_zeros(q.shape[0], q.shape[1] * q.shape[2], dtype=self.attn_dtype)
        q = q.to(self.attn_dtype) * self.scale  # once here rather than on every tile's scores
        single = slots and slots["single"]
        if single:
            out[single["rows"]] = self._single_query_attention(layer, q[single["rows"]], cache, single)
        if cache is not None:
            if slots["read"] is None:
                return out.to(self.dtype)
            k, v = cache.read(layer, slots["read"])  # the keys and values of every chunk read below, in one gather
        lo = kv_lo = 0
        for ch in chunks:
            begin, end = ch.start, ch.start + ch.length  # positions of this chunk's queries
            if cache is not None and ch.length == 1:  # attended above
                lo += 1
                continue
            # laid out for the products once per chunk, not once per tile: [kv_heads, D, keys] and [kv_heads, keys, D]
            ks = k[kv_lo : kv_lo + end].permute(1, 2, 0).to(self.attn_dtype, memory_format=torch.contiguous_format)
            vs = v[kv_lo : kv_lo + end].transpose(0, 1).to(self.attn_dtype, memory_format=torch.contiguous_format)
            kv_lo += end
            while begin < end:
                stop = min((begin // tile + 1) * tile, end)  # this tile's queries: positions begin..stop-1
                if not (cache is not None and stop == end and _one_query_tail(ch, tile)):  # else attended above
                    rows = slice(lo + begin - ch.start, lo + stop - ch.start)
                    out[rows] = self._tile_attention(q[rows], ks[:, :, :stop], vs[:, :stop], begin)
                begin = stop
            lo += ch.length
        return out.to(self.dtype)

    def _single_query_attention(self, layer: int, q: torch.Tensor, cache: PagedKVCache, s: dict) -> torch.Tensor:
        """One-query tiles of all sequences at once (q [R, heads, D], pre-scaled) -> [R, heads * D].

        Split-K over the sequences' cache blocks, as decode kernels do: one product per (query, block) for all of
        them, a softmax numerator and denominator per block, then the blocks' parts combined with their maxima
        rescaled. Every block's work has the same shape whatever the batch, and the blocks of a query are summed in
        block order over a grid padded with zeros, so each query's bits depend only on its own sequence."""
        c = self.cfg
        kvh, d, heads = c.num_kv_heads, c.head_size, c.num_heads
        g = heads // kvh
        kt, vt = (t.to(self.attn_dtype) for t in cache.read_blocks(layer, s["blocks"]))  # [P, kv_heads, block, D]
        p, block = kt.shape[0], kt.shape[2]
        qt = q.index_select(0, s["row_of_tile"]).view(p * kvh, g, d)
        scores = torch.bmm(qt, kt.view(p * kvh, block, d).transpose(1, 2)).view(p, heads, block) + s["bias"]
        peak = scores.amax(-1, keepdim=True)  # [P, heads, 1]: finite, every tile holds a key
        e = torch.exp(scores - peak)
        parts = torch.bmm(e.view(p * kvh, g, block), vt.view(p * kvh, block, d)).view(p, heads, d)
        # each tile's numerator, denominator and maximum, placed in a [rows, max_tiles] grid padded with empty tiles
        grid = s["empty"].index_copy(0, s["grid"], torch.cat([parts, e.sum(-1, keepdim=True), peak], -1))
        grid = grid.view(q.shape[0], s["max_tiles"], heads, d + 2)
        peaks = grid[..., d + 1 :]
        w = torch.exp(peaks - peaks.amax(1, keepdim=True))  # each tile's weight; 0 for the padding
        o = (w * grid[..., : d + 1]).sum(1)  # [rows, heads, D + 1]
        return (o[..., :d] / o[..., d:]).reshape(q.shape[0], heads * d)

    def _tile_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> torch.Tensor:
        """Causal attention of the (pre-scaled) queries at positions first.. (q [n, heads, D]) to keys 0..first+n-1
        (k [kv_heads, D, first+n], v [kv_heads, first+n, D]), GQA without copying K/V per query head
        -> [n, heads * D]."""
        n, kvh, d = q.shape[0], self.cfg.num_kv_heads, self.cfg.head_size
        g = self.cfg.num_heads // kvh  # query head h uses kv head h // g
        qg = q.reshape(n, kvh, g, d).transpose(0, 1).reshape(kvh, n * g, d)
        scores = torch.bmm(qg, k)  # [kv_heads, n * g, keys]
        if n > 1:  # query at position p sees keys 0..p
            keys = torch.arange(first + n, device=self.device)
            hidden = keys[None, :] > torch.arange(first, first + n, device=self.device)[:, None]  # [n, keys]
            scores = (
                scores.view(kvh, n, g, -1).masked_fill(hidden[None, :, None, :], float("-inf")).view(kvh, n * g, -1)
            )
        o = torch.bmm(scores.float().softmax(-1).to(v.dtype), v)  # [kv_heads, n * g, D]
        return o.view(kvh, n, g, d).transpose(0, 1).reshape(n, -1)
