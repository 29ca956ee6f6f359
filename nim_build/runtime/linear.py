"""The decoder's GEMMs: each weight is prepared once, at load, for the device and the compute dtype.

Three CPU choices, each measured on the embedded model's shapes (bench/runtime.py, BENCHMARKS.md section 5):
- bf16 compute on a CPU with native bf16 matmul (AVX512-BF16 or AMX): the weight in oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing uses). For decode-sized inputs it
  streams the weights about twice as fast as a plain bf16 matmul (measured: 14 vs 7 GB/s, 2-row inputs). An FP8
  linear there is TensorRT-LLM's FP8 GEMM in bf16: the input's FP8 values (exact in bf16) times the weights with
  both scales folded in (`scaled_input`).
- float32 compute (the accuracy gate's mode, and CPUs without native bf16): MKL's sgemm, with which the gate's
  numbers were measured.
- FP8 weights are dequantized once at load into the compute dtype when the dequantized copy fits the memory this
  process may take (it doubles the weights' size in bf16); the bits are those of dequantizing on every call.
  Otherwise, and on CUDA (where dequantizing is cheap, or `torch._scaled_mm` runs FP8 natively), they stay FP8.

Batch invariance: a row's result must not depend on how many rows share the GEMM. Which row counts a GEMM library
computes a row the same way for depends on the CPU (measured with the embedded model's shapes): MKL's sgemm on an
AMD EPYC for every multiple of 4, on an Intel Xeon with AVX-512 for 4, 8 and 12 rows but not 16; oneDNN's bf16
kernel on AVX512-BF16 for every count but 1, with AMX for 1 to 32 rows but not 33. What held on every CPU: within
one GEMM of a given row count, a row's bits depend neither on the other rows nor on its place. So a batch-invariant
GEMM (`tiled`: the serving path, a forward over a KV cache) runs its rows in calls of at most `rows` rows, each a
multiple of `multiple` rows (zeros padding the last), where (multiple, rows) is the first of TILINGS for which this
CPU computes the same bits in every such call: measured once per GEMM shape in the process, in the thread that
serves (`tiling`). tests/test_runtime.py and tests/test_scheduler.py check the bits. Other forwards (the accuracy
gate's: whole sequences, no cache) run one GEMM padded as before, so their bits stay those the gate was measured
with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nim_build.runtime import fp8
from nim_build.runtime.checkpoint import Linear

MKL_ROW_TILE = 4  # untiled float32 GEMMs run a multiple of this many rows
ONEDNN_MIN_ROWS = 2  # untiled oneDNN bf16 GEMMs run at least this many rows (1 row is a matrix-vector kernel)
# Batch-invariant GEMM calls, (multiple, rows): calls of `multiple`, 2 x `multiple`, ... up to `rows` rows. In order
# of preference: the fewer padding rows a decode step gets, then the more rows one call takes. The last one always
# holds (one row count).
TILINGS = ((1, 64), (1, 32), (1, 16), (2, 64), (2, 32), (2, 16), (4, 64), (4, 32), (4, 16), (4, 8), (4, 4))
_measured_tilings: dict[tuple, tuple[int, int]] = {}


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX) and oneDNN can use it: only then is bf16
    compute faster than float32 (elsewhere oneDNN emulates it)."""
    return (
        torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    )


@dataclass
class PreparedLinear:
    weight: torch.Tensor  # [out, in] in the compute dtype (on the meta device when packed), or FP8 (then w_scale)
    w_scale: torch.Tensor | None = None
    a_scale: torch.Tensor | None = None  # an FP8 checkpoint linear's static activation scale
    per_token: bool = False
    quantize_input: bool = False  # an FP8 checkpoint linear: its input is rounded to FP8, as TensorRT-LLM does
    packed: torch.Tensor | None = None  # oneDNN's blocked copy of `weight` (bf16 CPU compute)
    # bf16 CPU compute of an FP8 linear, TensorRT-LLM's FP8 GEMM in bf16: the input's FP8 values (exact in bf16)
    # times W_fp8 * w_scale * a_scale (a static activation scale folded into the packed weights; a per-token one
    # multiplies the output)
    scaled_input: bool = False

    @classmethod
    def prepare(
        cls, lin: Linear, device: torch.device, dtype: torch.dtype, *, dequantize: bool, fake_quant: bool
    ) -> PreparedLinear:
        """dequantize: an FP8 weight becomes `dtype` now (else it stays FP8 and is dequantized per call).
        fake_quant: an FP8 linear's input is rounded to FP8 at its activation scale."""

        def move(s):
            return None if s is None else s.to(device)

        w_scale, a_scale = move(lin.w_scale), move(lin.a_scale)
        quantize_input = fake_quant and lin.is_fp8 and (lin.per_token or a_scale is not None)
        packable = device.type == "cpu" and dtype == torch.bfloat16 and native_bf16_cpu()
        scaled_input = packable and quantize_input and dequantize
        if not lin.is_fp8:
            weight = lin.weight.to(device, dtype)
        elif dequantize:
            fold = scaled_input and not lin.per_token
            weight = fp8.dequantize(lin.weight, w_scale * a_scale if fold else w_scale, dtype)
        else:
            weight = lin.weight.to(device)
        packed = None
        if packable and weight.dtype == torch.bfloat16:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, ONEDNN_MIN_ROWS)
            weight = weight.to("meta")  # its shape and dtype: the packed copy is the one held in memory
        return cls(weight, w_scale, a_scale, lin.per_token, quantize_input, packed, scaled_input)

    def tiling(self, dtype: torch.dtype, native_fp8: bool) -> tuple[int, int]:
        """(multiple, rows) of this GEMM's batch-invariant calls on this CPU: the first of TILINGS under which every
        call computes random rows with the bits of calls of `multiple` rows; measured once per GEMM shape and path."""
        key = (tuple(self.weight.shape), self.weight.dtype, self.packed is not None, self.quantize_input,
               self.scaled_input, self.per_token, dtype, native_fp8, torch.get_num_threads())  # fmt: skip
        if key not in _measured_tilings:
            gen = torch.Generator().manual_seed(0)
            device = (self.weight if self.packed is None else self.packed).device  # a packed weight is on meta
            x = torch.randn(TILINGS[0][1], self.weight.shape[1], generator=gen).to(device, dtype)
            for multiple, rows in TILINGS:
                ref = torch.cat([self._gemm(part, dtype, native_fp8) for part in x[:rows].split(multiple)])
                counts = range(2 * multiple, rows + 1, multiple)
                if all(torch.equal(self._gemm(x[:m], dtype, native_fp8), ref[:m]) for m in counts):
                    _measured_tilings[key] = (multiple, rows)
                    break
        return _measured_tilings[key]

    def padded_rows(self, rows: int, dtype: torch.dtype, native_fp8: bool, tiled: bool) -> int:
        """The row count `rows` rows run at."""
        if tiled:
            multiple = self.tiling(dtype, native_fp8)[0]
            return rows + -rows % multiple
        if self.packed is not None:
            return max(rows, ONEDNN_MIN_ROWS)
        return rows + -rows % MKL_ROW_TILE

    @property
    def is_fp8(self) -> bool:
        """The weight is held as FP8 (multiplied by the native FP8 GEMM, or dequantized per call)."""
        return self.weight.dtype == fp8.FP8

    def __call__(self, x: torch.Tensor, dtype: torch.dtype, native_fp8: bool, tiled: bool = False) -> torch.Tensor:
        """x [T, in] -> [T, out] in `dtype`; tiled: batch invariant (see `tiling`)."""
        rows = x.shape[0]
        pad = self.padded_rows(rows, dtype, native_fp8, tiled) - rows
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        per_call = self.tiling(dtype, native_fp8)[1] if tiled else x.shape[0]
        if x.shape[0] > per_call:
            y = torch.cat([self._gemm(part, dtype, native_fp8) for part in x.split(per_call)])
        else:
            y = self._gemm(x, dtype, native_fp8)
        return y[:rows] if pad else y

    def _gemm(self, x: torch.Tensor, dtype: torch.dtype, native_fp8: bool) -> torch.Tensor:
        if self.is_fp8 and native_fp8 and fp8.scaled_mm_ok(self):
            return fp8.scaled_mm_linear(x, self, dtype)
        if self.quantize_input:
            scale = fp8.per_token_scale(x) if self.per_token else self.a_scale
            if self.scaled_input:
                y = _onednn(fp8.values(fp8.quantize(x, scale), dtype), self.packed)
                return y.mul_(scale) if self.per_token else y
            x = fp8.fake_quant(x, scale)
        if self.packed is not None:
            return _onednn(x, self.packed)
        if self.is_fp8:
            return x @ fp8.dequantize(self.weight, self.w_scale, dtype).t()
        return x @ self.weight.t()


def _onednn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def fuse_outputs(a: Linear, b: Linear) -> Linear | None:
    """One linear computing a's outputs then b's from the same input (the bits of the two GEMMs: each output's sum
    runs the same way), or None when their inputs are quantized differently or their weight scales cannot be laid
    side by side."""
    if (a.is_fp8, a.per_token) != (b.is_fp8, b.per_token) or not _same(a.a_scale, b.a_scale):
        return None
    w_scale = None
    if a.is_fp8:
        if a.w_scale.shape == b.w_scale.shape == (1, 1) and torch.equal(a.w_scale, b.w_scale):
            w_scale = a.w_scale
        elif a.w_scale.shape[1] == b.w_scale.shape[1] == 1 and a.w_scale.shape[0] > 1 and b.w_scale.shape[0] > 1:
            w_scale = torch.cat([a.w_scale, b.w_scale])  # per output row
        else:
            return None
    return Linear(torch.cat([a.weight, b.weight]), w_scale, a.a_scale, a.per_token)


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
