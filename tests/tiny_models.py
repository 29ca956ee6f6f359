"""Tiny random Llama/Mistral checkpoints for tests, in each producer's config.json spelling.

`make_tiny_model(out_dir)` writes a Hugging Face checkpoint (config.json + model.safetensors, no tokenizer)
in a few hundred milliseconds. The config is rewritten in one of three spellings (docs/FORMATS.md, section 1):

| spelling | dtype field   | RoPE base                                                                |
|----------|---------------|--------------------------------------------------------------------------|
| "nemo"   | `torch_dtype` | top-level `rope_theta` (+ `rope_scaling` as given)                       |
| "tf457"  | `dtype`       | top-level `rope_theta` (+ `rope_scaling` as given)                       |
| "tf5"    | `dtype`       | `rope_parameters: {rope_theta, rope_type, ...scaling}`, no `rope_theta`  |

`rope_scaling` is written as given, so a caller picks `"type"` or `"rope_type"` itself; `LLAMA3_SCALING` and
`llama3_scaling(key=...)` give the usual llama3 dict. For "tf5" the scaling keys are merged into
`rope_parameters` (without `type`/`rope_type` duplication) and no `rope_scaling` key is written, as
transformers 5 does.

Weights: linears ~N(0, 0.02) times a per-tensor factor in [0.5, 2] (so per-tensor FP8 scales differ),
k_proj/v_proj further times `kv_weight_scale` (e.g. 2e4 pushes K/V amax past 448, so FP8 KV-cache scales
are not clamped to 1.0);
RMSNorm weights ~1 + N(0, 0.2) (never trivially all ones); embeddings ~N(0, 1) so activations are O(1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPELLINGS = ("nemo", "tf457", "tf5")
ARCHS = ("MistralForCausalLM", "LlamaForCausalLM")

LLAMA3_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def llama3_scaling(key: str = "rope_type") -> dict[str, Any]:
    """The llama3 rope_scaling dict with its type under `key` ("rope_type" or the older "type")."""
    d = dict(LLAMA3_SCALING)
    d[key] = d.pop("rope_type")
    return d


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    tie_word_embeddings: bool = False,
    rope_theta: float = 1e6,
    rope_scaling: dict[str, Any] | None = None,
    spelling: str = "nemo",
    dtype: torch.dtype = torch.bfloat16,
    arch: str = "MistralForCausalLM",
    seed: int = 0,
    max_position_embeddings: int = 4096,
    kv_weight_scale: float = 1.0,
) -> Path:
    """Build a random model, save it with save_pretrained, rewrite config.json in `spelling`; return out_dir.

    `head_dim` defaults to hidden_size // num_heads (NeMo-like: pass e.g. hidden 80, heads 4, head_dim 16).
    """
    if spelling not in SPELLINGS:
        raise ValueError(f"spelling {spelling!r} not in {SPELLINGS}")
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} not in {ARCHS}")
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=float(rope_theta),
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "MistralForCausalLM":
        config = transformers.MistralConfig(sliding_window=None, **common)
        model_cls = transformers.MistralForCausalLM
    else:
        config = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        model_cls = transformers.LlamaForCausalLM

    torch.manual_seed(seed)
    model = model_cls(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 2:  # linears (lm_head included)
                factor = float(torch.empty(1).uniform_(0.5, 2.0, generator=g))
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 * factor))
                if name.endswith(("k_proj.weight", "v_proj.weight")):
                    p.mul_(kv_weight_scale)
    model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    _respell_config(out / "config.json", spelling, dtype, float(rope_theta), rope_scaling, arch)
    gen = out / "generation_config.json"
    if gen.exists():
        gen.unlink()
    return out


def _respell_config(
    path: Path, spelling: str, dtype: torch.dtype, rope_theta: float, rope_scaling: dict[str, Any] | None, arch: str
) -> None:
    cfg = json.loads(path.read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_theta", None)
    cfg["architectures"] = [arch]
    if spelling == "nemo":
        cfg["torch_dtype"] = dtype_name
        cfg["rope_theta"] = rope_theta
        cfg["rope_scaling"] = dict(rope_scaling) if rope_scaling else None
        cfg["transformers_version"] = "4.43.0.dev0"
    elif spelling == "tf457":
        cfg["dtype"] = dtype_name
        cfg["rope_theta"] = rope_theta
        cfg["rope_scaling"] = dict(rope_scaling) if rope_scaling else None
        cfg["transformers_version"] = "4.57.3"
    else:  # tf5
        cfg["dtype"] = dtype_name
        params: dict[str, Any] = {"rope_theta": rope_theta, "rope_type": "default"}
        if rope_scaling:
            extra = dict(rope_scaling)
            params["rope_type"] = extra.pop("rope_type", extra.pop("type", "default"))
            params.update(extra)
        cfg["rope_parameters"] = params
        cfg["transformers_version"] = "5.0.0"
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def make_calib_ids(vocab_size: int = 256, n: int = 4, seq: int = 32, seed: int = 0):
    """A calibration batch: int64 numpy array [n, seq] of token ids (no padding)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab_size, size=(n, seq), dtype=np.int64)


def make_slow_model(out_dir: str | Path) -> Path:
    """A random model big enough (~60 MB) that its build takes seconds, so a signal can land in the middle of it;
    small enough for CI."""
    return make_tiny_model(
        out_dir, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=1536, vocab_size=16000
    )


def convert(
    model_dir, out_dir, *, quant: str = "bf16", tp: int = 1, kv_cache: str = "auto", calib_ids=None, **kwargs
) -> dict:
    """nim_build's streamed converter on model_dir, opened and planned as `nim_build engine` does it."""
    from nim_build.builder.convert import convert_checkpoint
    from nim_build.builder.plan import make_plan
    from nim_build.builder.source import open_source

    source = open_source(model_dir)
    try:
        return convert_checkpoint(
            source, out_dir, make_plan(source.spec, tp), quant=quant, kv_cache=kv_cache, calib_ids=calib_ids, **kwargs
        )
    finally:
        source.close()
