"""Read a TensorRT-LLM checkpoint (docs/FORMATS.md, section 3) of any tp and merge its ranks into one set of weights.

Merging undoes the tensor-parallel split: column-parallel weights (qkv, fc, gate, lm_head) are concatenated on
dim 0, row-parallel ones (dense, proj) on dim 1; the fused qkv of each rank is q_r | k_r | v_r, and KV heads that
were replicated because nkv < tp are taken once. FP8 weights stay float8_e4m3fn; their per-rank scales become one
dequantization multiplier broadcastable to the merged weight: [1, 1] (one scale), [out, 1] (per output row) or
[1, in] (per input column, a row-parallel weight whose ranks had different scales).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from nim_build import formats
from nim_build.errors import CheckpointError, ConfigError
from nim_build.formats import KV_CACHE_QUANT_ALGO_NAMES, QUANT_ALGO_NAMES

FP8 = torch.float8_e4m3fn
QUANT_ALGOS = (None, *QUANT_ALGO_NAMES)
ROPE_TYPES = (None, *formats.ROPE_TYPES)


@dataclass
class ModelConfig:
    architecture: str
    dtype: torch.dtype
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: float
    rotary_scaling: dict | None
    tp: int
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        mapping = d.get("mapping") or {}
        quant = d.get("quantization") or {}
        if mapping.get("pp_size", 1) != 1:
            raise ConfigError(
                "pipeline-parallel checkpoints (pp_size > 1) are not supported by the reference runtime; "
                "convert with pp=1"
            )
        if d.get("dtype", "bfloat16") not in formats.DTYPES:
            raise ConfigError(f"checkpoint dtype {d.get('dtype')!r} not in {', '.join(formats.DTYPES)}")
        if quant.get("quant_algo") not in QUANT_ALGOS:
            raise ConfigError(f"quant_algo {quant.get('quant_algo')!r} is not supported; supported: {QUANT_ALGOS}")
        if quant.get("kv_cache_quant_algo") not in (None, *KV_CACHE_QUANT_ALGO_NAMES):
            raise ConfigError(
                f"kv_cache_quant_algo {quant.get('kv_cache_quant_algo')!r} is not supported; use FP8 or null"
            )
        scaling = d.get("rotary_scaling")
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rotary_scaling type {rope_type!r} is not supported; supported: linear, llama3")
        heads = d["num_attention_heads"]
        return cls(
            architecture=d.get("architecture", "LlamaForCausalLM"),
            dtype=formats.torch_dtype(d.get("dtype", "bfloat16")),
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_size=d.get("head_size") or d["hidden_size"] // heads,
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            norm_epsilon=d.get("norm_epsilon", 1e-5),
            rotary_base=float(d.get("rotary_base", 10000.0)),
            rotary_scaling=scaling if rope_type not in (None, "default") else None,
            tp=mapping.get("tp_size", 1),
            quant_algo=quant.get("quant_algo"),
            kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
            use_parallel_embedding=bool(d.get("use_parallel_embedding", False)),
            embedding_sharding_dim=d.get("embedding_sharding_dim", 0),
        )


@dataclass
class Linear:
    """y = x @ (weight * w_scale).T; FP8 weights carry scales, float weights none."""

    weight: torch.Tensor
    w_scale: torch.Tensor | None = None  # float32, [1,1] | [out,1] | [1,in]
    a_scale: torch.Tensor | None = None  # float32, [1,1] | [1,in]: static activation scale
    per_token: bool = False  # dynamic per-token activation quantization (FP8_PER_CHANNEL_PER_TOKEN)

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8


@dataclass
class Layer:
    input_layernorm: torch.Tensor
    qkv: Linear
    dense: Linear
    post_layernorm: torch.Tensor
    fc: Linear  # HF gate_proj, the SiLU branch
    gate: Linear  # HF up_proj
    proj: Linear  # HF down_proj
    kv_scale: torch.Tensor | None = None  # float32 [1]: FP8 KV-cache dequantization multiplier


@dataclass
class Checkpoint:
    config: ModelConfig
    embedding: torch.Tensor
    layers: list[Layer] = field(default_factory=list)
    ln_f: torch.Tensor | None = None
    lm_head: Linear | None = None


def load_checkpoint(ckpt_dir: str | Path) -> Checkpoint:
    """Load config.json + rank{r}.safetensors and merge the ranks (tensors on CPU, FP8 kept FP8)."""
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no config.json: not a TensorRT-LLM checkpoint directory")
    raw = json.loads(cfg_path.read_text())
    cfg = ModelConfig.from_dict(raw)
    world = (raw.get("mapping") or {}).get("world_size", cfg.tp)
    paths = [ckpt_dir / f"rank{r}.safetensors" for r in range(world)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"{ckpt_dir} lacks {', '.join(missing)} (world_size {world}); re-run the conversion")
    handles = [safe_open(str(p), framework="pt") for p in paths]
    return _Merger(cfg, handles).checkpoint()


class _Merger:
    def __init__(self, cfg: ModelConfig, handles):
        self.cfg = cfg
        self.files = handles
        self.keys = set(handles[0].keys())

    def get(self, name: str, rank: int = 0) -> torch.Tensor:
        try:
            return self.files[rank].get_tensor(name)
        except Exception as e:  # safetensors raises its own error type for a missing name
            raise CheckpointError(f"tensor {name!r} missing from rank{rank}.safetensors ({e})") from None

    def opt(self, name: str, rank: int = 0) -> torch.Tensor | None:
        return self.get(name, rank).float() if name in self.keys else None

    def checkpoint(self) -> Checkpoint:
        c = self.cfg
        emb = self._embedding()
        layers = [self._layer(i) for i in range(c.num_layers)]
        if "lm_head.weight" in self.keys:
            lm_head = self._linear("lm_head", "col")
            lm_head.weight = lm_head.weight[: c.vocab_size]
            if lm_head.w_scale is not None and lm_head.w_scale.shape[0] > 1:
                lm_head.w_scale = lm_head.w_scale[: c.vocab_size]
        else:  # tied embeddings written without a separate lm_head
            lm_head = Linear(emb)
        return Checkpoint(c, emb, layers, self.get("transformer.ln_f.weight"), lm_head)

    def _embedding(self) -> torch.Tensor:
        name = "transformer.vocab_embedding.weight"
        if not self.cfg.use_parallel_embedding or self.cfg.tp == 1:
            return self.get(name)[: self.cfg.vocab_size]
        dim = self.cfg.embedding_sharding_dim
        return torch.cat([self.get(name, r) for r in range(self.cfg.tp)], dim=dim)[: self.cfg.vocab_size]

    def _layer(self, i: int) -> Layer:
        p = f"transformer.layers.{i}."
        kv = [self.opt(p + "attention.kv_cache_scaling_factor", r) for r in range(self.cfg.tp)]
        return Layer(
            input_layernorm=self.get(p + "input_layernorm.weight"),
            qkv=self._linear(p + "attention.qkv", "qkv"),
            dense=self._linear(p + "attention.dense", "row"),
            post_layernorm=self.get(p + "post_layernorm.weight"),
            fc=self._linear(p + "mlp.fc", "col"),
            gate=self._linear(p + "mlp.gate", "col"),
            proj=self._linear(p + "mlp.proj", "row"),
            kv_scale=None if kv[0] is None else torch.stack(kv).max().reshape(1),
        )

    def _linear(self, prefix: str, kind: str) -> Linear:
        tp = self.cfg.tp
        ws = [self.get(prefix + ".weight", r) for r in range(tp)]
        w_scales = [self._w_scale(prefix, r) for r in range(tp)]
        a_scales = [self.opt(prefix + ".activation_scaling_factor", r) for r in range(tp)]
        per_token = ws[0].dtype == FP8 and self.cfg.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN"
        if ws[0].dtype == FP8 and w_scales[0] is None:
            raise CheckpointError(f"{prefix}.weight is FP8 but has no weights_scaling_factor")
        if kind == "row":
            weight = _cat(ws, 1)
            w_scale = self._merge_row_scales(prefix, ws, w_scales)
            a_scale = (
                None
                if a_scales[0] is None
                else _compact(torch.cat([s.reshape(1).expand(w.shape[1]) for s, w in zip(a_scales, ws)]).reshape(1, -1))
            )
        else:
            # per-rank row-scale vectors, split and selected exactly like the weight rows
            rows = (
                None
                if w_scales[0] is None
                else [s.reshape(-1).expand(w.shape[0]).reshape(-1, 1) for s, w in zip(w_scales, ws)]
            )
            if kind == "qkv":
                weight = self._merge_qkv(ws)
                w_scale = None if rows is None else _compact(self._merge_qkv(rows))
            else:
                weight = _cat(ws, 0)
                w_scale = None if rows is None else _compact(torch.cat(rows, dim=0))
            # every rank quantizes the same (replicated) input; ranks agree for the official exporter
            a_scale = (
                None if a_scales[0] is None else torch.stack([s.reshape(()) for s in a_scales]).max().reshape(1, 1)
            )
        return Linear(weight, w_scale, None if per_token else a_scale, per_token)

    def _w_scale(self, prefix: str, rank: int) -> torch.Tensor | None:
        s = self.opt(prefix + ".weights_scaling_factor", rank)
        return s if s is not None else self.opt(prefix + ".per_channel_scale", rank)

    def _merge_row_scales(self, prefix, ws, scales) -> torch.Tensor | None:
        if scales[0] is None:
            return None
        if all(s.numel() == 1 for s in scales):
            return _compact(torch.cat([s.reshape(1).expand(w.shape[1]) for s, w in zip(scales, ws)]).reshape(1, -1))
        if all(torch.equal(s, scales[0]) for s in scales):  # per-channel [out], the same on every rank
            return _compact(scales[0].reshape(-1, 1))
        raise CheckpointError(f"{prefix}: per-channel scales differ between ranks of a row-parallel weight")

    def _merge_qkv(self, per_rank: list[torch.Tensor]) -> torch.Tensor:
        c, tp = self.cfg, self.cfg.tp
        nq = c.num_heads // tp * c.head_size
        nkv_rank = max(c.num_kv_heads, tp) // tp
        nk = nkv_rank * c.head_size
        if per_rank[0].shape[0] != nq + 2 * nk:
            raise CheckpointError(
                f"qkv rows per rank {per_rank[0].shape[0]} != {nq} + 2*{nk} for {c.num_heads} heads, "
                f"{c.num_kv_heads} KV heads, head_size {c.head_size}, tp {tp}"
            )
        # with nkv < tp, rank r holds KV head r // (tp // nkv): keep one rank per KV head
        kv_ranks = range(0, tp, tp // c.num_kv_heads) if c.num_kv_heads < tp else range(tp)
        q = [t[:nq] for t in per_rank]
        k = [per_rank[r][nq : nq + nk] for r in kv_ranks]
        v = [per_rank[r][nq + nk :] for r in kv_ranks]
        return _cat(q + k + v, 0) if self.cfg.tp > 1 else per_rank[0]


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _compact(scale: torch.Tensor) -> torch.Tensor:
    """A scale vector whose entries are all equal becomes the [1, 1] per-tensor scale."""
    scale = scale.float()
    flat = scale.reshape(-1)
    return flat[:1].reshape(1, 1).clone() if bool((flat == flat[0]).all()) else scale.contiguous()
