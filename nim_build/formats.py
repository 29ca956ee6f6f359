"""Names of the TensorRT-LLM checkpoint format that the builder writes and the reference runtime reads.

The format itself is described in docs/FORMATS.md. What a value may be is declared here once: the builder checks
what it writes against it and the runtime what it reads.
"""

from __future__ import annotations

from nim_build.options import QUANT_ALGOS

DTYPES = ("bfloat16", "float16", "float32")  # checkpoint `dtype` values
# Spellings of a dtype in HF config.json files (`torch_dtype` / `dtype`), by producer, -> the checkpoint's name.
DTYPE_SPELLINGS = {
    **{d: d for d in DTYPES},
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float": "float32",
}
QUANT_ALGO_NAMES = tuple(sorted({a for a in QUANT_ALGOS.values() if a}))  # quantization.quant_algo, or null
KV_CACHE_QUANT_ALGO_NAMES = ("FP8",)  # quantization.kv_cache_quant_algo, or null
ROPE_TYPES = ("default", "linear", "llama3")  # rotary_scaling types (HF rope_scaling `type` / `rope_type`)


def torch_dtype(name: str):
    """torch.bfloat16 for "bfloat16", etc."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)
