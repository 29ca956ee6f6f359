"""Paged KV cache: a pool of fixed-size blocks shared by all sequences, and its allocator."""

from __future__ import annotations

import math

import numpy as np
import torch

from nim_build.runtime import fp8


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.total = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose CPU pages are committed when first written: calloc (numpy.zeros) maps fresh zero pages
    for a large block instead of writing them, so the pool's resident memory is what the requests have used.
    (Zeros, not garbage: a masked score times an unwritten NaN would still be NaN.)"""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class PagedKVCache:
    """K and V per layer as [num_blocks, kv_heads, block_size, head_size]: a block holds each head's keys back to
    back, so the blocks a sequence attends to are gathered in one index and used by the products as they are. A
    token's slot is block_table[pos // block_size] * block_size + pos % block_size. With FP8 scales (one per
    layer), entries are stored as E4M3 of k / scale and read back as E4M3 * scale."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device,
        fp8_scales: list[torch.Tensor] | None = None,
    ):
        self.block_size = block_size
        self.scales = None if fp8_scales is None else [s.to(device).reshape(1, 1, 1) for s in fp8_scales]
        store = torch.uint8 if fp8_scales is not None else dtype  # FP8 bytes (CPU indexing lacks float8 kernels)
        shape = (num_blocks, kv_heads, block_size, head_size)
        self.k = [_zeros(shape, store, device) for _ in range(num_layers)]
        self.v = [_zeros(shape, store, device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_size: int, elem_bytes: int) -> int:
        return 2 * num_layers * block_size * kv_heads * head_size * elem_bytes

    @staticmethod
    def element_bytes(fp8: bool, dtype: torch.dtype) -> int:
        """Bytes of one cached K or V value: FP8 with an FP8 KV cache, else the compute dtype's."""
        return 1 if fp8 else dtype.itemsize

    @staticmethod
    def full_need(
        num_layers: int,
        block_size: int,
        kv_heads: int,
        head_size: int,
        elem_bytes: int,
        max_batch_size: int,
        max_seq_len: int,
    ) -> int:
        """Bytes for max_batch_size sequences of max_seq_len: the most an engine's pool can ever hold in use."""
        blocks = max_batch_size * math.ceil(max_seq_len / block_size)
        return blocks * PagedKVCache.bytes_per_block(num_layers, block_size, kv_heads, head_size, elem_bytes)

    def slots(self, block_table: list[int], start: int, end: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(device)

    def write(self, layer: int, where: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [slots, kv_heads, head_size] at the slots `where` (from `locate`)."""
        if self.scales is not None:
            k = fp8.quantize(k, self.scales[layer]).view(torch.uint8)
            v = fp8.quantize(v, self.scales[layer]).view(torch.uint8)
        self.k[layer][where] = k
        self.v[layer][where] = v

    def read(self, layer: int, where: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at the slots `where` (from `locate`): [slots, kv_heads, head_size] each."""
        return self._values(layer, self.k[layer][where]), self._values(layer, self.v[layer][where])

    def read_blocks(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks: [len(blocks), kv_heads, block_size, head_size] each."""
        # index_select: 3x faster than indexing for a gather of whole blocks
        k, v = self.k[layer].index_select(0, blocks), self.v[layer].index_select(0, blocks)
        return self._values(layer, k), self._values(layer, v)

    def locate(self, slots: torch.Tensor) -> tuple:
        """Index of the slots' entries, [len(slots), kv_heads, head_size] out of [blocks, kv_heads, block, head]:
        computed once per step, used by every layer."""
        return slots // self.block_size, slice(None), slots % self.block_size

    def _values(self, layer: int, stored: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return stored
        # float32: what attention computes in on CPU
        return fp8.values(stored.view(fp8.FP8), torch.float32) * self.scales[layer]
