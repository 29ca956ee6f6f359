"""Stream an HF llama/mistral checkpoint into a TensorRT-LLM checkpoint (docs/FORMATS.md, section 3), tensor by tensor.

Stages: plan every output tensor from the spec (no weights read) -> one pass over the weights, layer by layer:
read the layer (the next one is read ahead), run the calibration activations through it (FP8 only), then for each
tensor group (qkv, dense, fc+gate, proj, norms) quantize, split over the tp ranks and write each piece at its
planned offset in rank{r}.safetensors on a writer thread. Embedding first, final norm and lm_head last.
Peak memory: two layers of HF weights, one group in float32, the calibration activations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nim_build.builder import families as F
from nim_build.builder import quantize as Q
from nim_build.builder.calibrate import LayerAmax, LayerCalibrator, read_layer
from nim_build.builder.plan import ParallelPlan
from nim_build.builder.safetensors_io import CheckpointReader, StreamingWriter, TensorSpec
from nim_build.builder.source import SourceModel
from nim_build.builder.spec import ModelSpec
from nim_build.formats import torch_dtype
from nim_build.options import QUANT_ALGOS, UNQUANTIZED_DTYPES

FP8 = torch.float8_e4m3fn
F32 = torch.float32
# Bumped whenever the checkpoint this module writes changes for the same inputs and options: engine caches key on it.
CONVERTER_VERSION = 1


@dataclass
class Group:
    """A set of output tensors computed together: planned specs per rank and a producer of their values."""

    specs: list[list[TensorSpec]]  # [rank] -> specs
    produce: Callable[[], list[dict[str, torch.Tensor]]]  # -> [rank] -> {name: tensor}


def trtllm_config(spec: ModelSpec, plan: ParallelPlan, quant: str, kv_cache: str, dtype: str) -> dict:
    """config.json of the TensorRT-LLM checkpoint."""
    quant_algo = QUANT_ALGOS[quant]
    cfg = {
        "producer": {"name": "nim_build"},
        "architecture": spec.architecture,
        "dtype": dtype,
        "logits_dtype": "float32",
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "hidden_size": spec.hidden_size,
        "head_size": spec.head_size,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "position_embedding_type": "rope_gpt_neox",
        "hidden_act": "silu",
        "norm_epsilon": spec.norm_epsilon,
        "rotary_base": spec.rotary_base,
        "rotary_scaling": spec.rotary_scaling,
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bias": False,
        "mapping": {"world_size": plan.tp, "tp_size": plan.tp, "pp_size": 1},
        "quantization": {
            "quant_algo": quant_algo,
            "kv_cache_quant_algo": "FP8" if kv_cache == "fp8" else None,
            "exclude_modules": ["lm_head"] if quant_algo else None,
        },
    }
    return cfg


def _split(t: torch.Tensor, tp: int, dim: int) -> list[torch.Tensor]:
    return [c.contiguous() for c in torch.chunk(t, tp, dim=dim)] if tp > 1 else [t]


def _replicate_kv(t: torch.Tensor, spec: ModelSpec, plan: ParallelPlan) -> torch.Tensor:
    """Repeat each KV head kv_replication times (rows of k_proj/v_proj), so tp ranks can each hold one."""
    if plan.kv_replication == 1:
        return t
    h = t.shape[-1]
    heads = t.reshape(spec.num_key_value_heads, spec.head_size, h)
    return heads.repeat_interleave(plan.kv_replication, dim=0).reshape(-1, h)


class _Builder:
    """Knows every output tensor: its per-rank shape and how to compute it."""

    def __init__(self, source: SourceModel, plan: ParallelPlan, quant: str, kv_cache: str, dtype: str):
        self.spec, self.plan, self.quant, self.kv_cache = source.spec, plan, quant, kv_cache
        self.dtype = torch_dtype(dtype)
        self.reader = source.reader
        self.family = source.family
        self.tp = plan.tp
        self.layer_weights: dict[str, torch.Tensor] = {}  # HF suffix -> tensor of the layer being written
        self.layer_amax: LayerAmax | None = None  # its calibration (FP8)

    # -- helpers -------------------------------------------------------------------------------------------
    def _plain(self, out: str, src: Callable[[], torch.Tensor], shape: tuple[int, ...], dim: int | None) -> Group:
        """An unquantized tensor, replicated (dim None) or split on dim."""
        per_rank = list(shape)
        if dim is not None:
            per_rank[dim] //= self.tp
        specs = [[TensorSpec(out, self.dtype, tuple(per_rank))] for _ in range(self.tp)]

        def produce():
            t = src()  # the writer casts it to self.dtype block by block: an fp32 copy of a 131k vocab is 2.7 GB
            parts = [t] * self.tp if dim is None else _split(t, self.tp, dim)
            return [{out: p} for p in parts]

        return Group(specs, produce)

    def _linear(
        self,
        prefix: str,
        shape: tuple[int, int],
        dim: int,
        weights: Callable[[], list[torch.Tensor]],
        act_amax: Callable[[], torch.Tensor | None],
        fuse: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        extra: tuple[list[str], Callable[[], dict[str, torch.Tensor]]] | None = None,
        out_prefixes: list[str] | None = None,
    ) -> Group:
        """One or more linears sharing an input (and, for FP8, the weight and activation scales).

        weights() returns the HF weights; fuse(list of per-source tensors) returns the per-rank weights.
        With out_prefixes, each source becomes its own output linear (fc and gate); else they are fused.
        extra: (names, producer) of float32 [1] tensors written with the group (the KV-cache scales).
        """
        names = out_prefixes or [prefix]
        rows, cols = shape
        per_rank = (rows // self.tp, cols) if dim == 0 else (rows, cols // self.tp)
        quant_algo = QUANT_ALGOS[self.quant]
        specs = [[] for _ in range(self.tp)]
        for r in range(self.tp):
            for n in names:
                specs[r].append(TensorSpec(f"{n}.weight", FP8 if quant_algo else self.dtype, per_rank))
                if quant_algo == "FP8":
                    specs[r].append(TensorSpec(f"{n}.weights_scaling_factor", F32, (1,)))
                    specs[r].append(TensorSpec(f"{n}.activation_scaling_factor", F32, (1,)))
                elif quant_algo == "FP8_PER_CHANNEL_PER_TOKEN":
                    specs[r].append(TensorSpec(f"{n}.per_channel_scale", F32, (per_rank[0],)))
            if extra is not None:
                specs[r] += [TensorSpec(k, F32, (1,)) for k in extra[0]]

        def produce():
            srcs = weights()
            out = [dict() for _ in range(self.tp)]
            if quant_algo == "FP8":
                w_scale = Q.scale_from_amax(torch.stack([Q.amax(s) for s in srcs]).amax())
                a_scale = Q.scale_from_amax(act_amax())
                qs = [Q.quantize_per_tensor(s, w_scale) for s in srcs]
            elif quant_algo == "FP8_PER_CHANNEL_PER_TOKEN":
                scales = [Q.per_channel_scale(s) for s in srcs]
                qs = [Q.quantize_per_channel(s, sc) for s, sc in zip(srcs, scales)]
            else:
                qs = [s.to(self.dtype) for s in srcs]
            if out_prefixes:
                pieces = [fuse([q]) for q in qs]  # [source][rank]
            else:
                pieces = [fuse(qs)]
            if quant_algo == "FP8_PER_CHANNEL_PER_TOKEN":
                # per-channel scales follow their rows: through the fusion and a row split, replicated by a
                # column split (every rank holds all output channels of a row-parallel linear)
                sc_rows = [s[:, None] for s in scales]
                if dim == 1:
                    sc_pieces = [[s] * self.tp for s in sc_rows]
                else:
                    sc_pieces = [fuse([s]) for s in sc_rows] if out_prefixes else [fuse(sc_rows)]
            for r in range(self.tp):
                for j, n in enumerate(names):
                    out[r][f"{n}.weight"] = pieces[j][r]
                    if quant_algo == "FP8":
                        out[r][f"{n}.weights_scaling_factor"] = w_scale
                        out[r][f"{n}.activation_scaling_factor"] = a_scale
                    elif quant_algo == "FP8_PER_CHANNEL_PER_TOKEN":
                        out[r][f"{n}.per_channel_scale"] = sc_pieces[j][r].reshape(-1).contiguous()
            if extra is not None:
                scalars = extra[1]()
                for r in range(self.tp):
                    out[r].update(scalars)
            return out

        return Group(specs, produce)

    # -- the model ---------------------------------------------------------------------------------------
    def head(self) -> list[Group]:
        H = self.spec.hidden_size
        # Parallel embedding (modelopt's default): vocab rows padded to a multiple of tp and split like lm_head.
        return [
            self._plain(
                "transformer.vocab_embedding.weight",
                lambda: self._padded_vocab(self.family.embed),
                (self.plan.padded_vocab_size, H),
                0,
            )
        ]

    def tail(self) -> list[Group]:
        s, fam, H = self.spec, self.family, self.spec.hidden_size
        head_src = fam.head_source(s.tie_word_embeddings, self.reader)
        return [
            self._plain("transformer.ln_f.weight", lambda: self.reader.get(fam.final_norm), (H,), None),
            self._plain("lm_head.weight", lambda: self._padded_vocab(head_src), (self.plan.padded_vocab_size, H), 0),
        ]

    def _padded_vocab(self, name: str) -> torch.Tensor:
        w = self.reader.get(name)
        pad = self.plan.padded_vocab_size - w.shape[0]
        return torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w

    def layer(self, i: int) -> list[Group]:
        """Groups of decoder layer i; they read self.layer_weights / self.layer_amax, set before producing."""
        s, tp, plan = self.spec, self.tp, self.plan
        H, I = s.hidden_size, s.intermediate_size
        p = f"transformer.layers.{i}."
        w = lambda suffix: self.layer_weights[suffix]  # noqa: E731
        amax = lambda attr: getattr(self.layer_amax, attr) if self.layer_amax else None  # noqa: E731

        def qkv_fuse(ws):
            q, k, v = ws
            k, v = _replicate_kv(k, s, plan), _replicate_kv(v, s, plan)
            return [torch.cat(parts, 0) for parts in zip(_split(q, tp, 0), _split(k, tp, 0), _split(v, tp, 0))]

        def kv_scales():
            # modelopt's exporter never lets a KV-cache scale go below 1.0; kv = max(k, v)
            k_sf = Q.scale_from_amax(amax("k")).clamp(min=1.0)
            v_sf = Q.scale_from_amax(amax("v")).clamp(min=1.0)
            return {
                p + "attention.k_cache_scaling_factor": k_sf,
                p + "attention.v_cache_scaling_factor": v_sf,
                p + "attention.kv_cache_scaling_factor": torch.maximum(k_sf, v_sf),
            }

        kv_rows = s.num_key_value_heads * plan.kv_replication * s.head_size
        kv_names = [p + f"attention.{n}_scaling_factor" for n in ("k_cache", "v_cache", "kv_cache")]
        return [
            self._plain(p + "input_layernorm.weight", lambda: w(F.INPUT_NORM), (H,), None),
            self._linear(
                p + "attention.qkv",
                (s.q_size + 2 * kv_rows, H),
                0,
                lambda: [w(F.Q), w(F.K), w(F.V)],
                lambda: amax("qkv_in"),
                qkv_fuse,
                extra=(kv_names, kv_scales) if self.kv_cache == "fp8" else None,
            ),
            self._linear(
                p + "attention.dense",
                (H, s.q_size),
                1,
                lambda: [w(F.O)],
                lambda: amax("dense_in"),
                lambda ws: _split(ws[0], tp, 1),
            ),
            self._plain(p + "post_layernorm.weight", lambda: w(F.POST_NORM), (H,), None),
            # HF gate_proj (the SiLU branch) is TensorRT-LLM's mlp.fc, up_proj is mlp.gate: one shared scale pair.
            self._linear(
                p + "mlp.fc",
                (I, H),
                0,
                lambda: [w(F.GATE), w(F.UP)],
                lambda: amax("fc_in"),
                lambda ws: _split(ws[0], tp, 0),
                out_prefixes=[p + "mlp.fc", p + "mlp.gate"],
            ),
            self._linear(
                p + "mlp.proj", (H, I), 1, lambda: [w(F.DOWN)], lambda: amax("proj_in"), lambda ws: _split(ws[0], tp, 1)
            ),
        ]


class _LayerStream:
    """HF weights one decoder layer at a time, the next layer read ahead on a background thread."""

    def __init__(self, reader: CheckpointReader, family: F.Family, num_layers: int):
        self.reader, self.family, self.num_layers = reader, family, num_layers
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self.next = self.pool.submit(read_layer, reader, family, 0) if num_layers else None

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        weights = self.next.result()
        self.next = self.pool.submit(read_layer, self.reader, self.family, i + 1) if i + 1 < self.num_layers else None
        return weights

    def close(self):
        self.pool.shutdown(cancel_futures=True)


def _dtype(source: SourceModel, quant: str, dtype: str | None) -> str:
    return dtype or UNQUANTIZED_DTYPES.get(quant, source.spec.dtype)


def _groups(source: SourceModel, plan: ParallelPlan, quant: str, kv_cache: str, dtype: str):
    """The builder and its groups of output tensors: head, [per layer], tail (planned, nothing read)."""
    builder = _Builder(source, plan, quant, kv_cache, dtype)
    layers = [builder.layer(i) for i in range(source.spec.num_hidden_layers)]
    return builder, builder.head(), layers, builder.tail()


def planned_bytes(
    source: SourceModel, plan: ParallelPlan, *, quant: str, kv_cache: str = "auto", dtype: str | None = None
) -> int:
    """Bytes of tensor data the checkpoint of these options will hold, over all ranks (nothing is read)."""
    _, head, layers, tail = _groups(source, plan, quant, kv_cache, _dtype(source, quant, dtype))
    groups = head + [g for gs in layers for g in gs] + tail
    return sum(t.nbytes for g in groups for rank in g.specs for t in rank)


def planned_spec_bytes(spec: ModelSpec, plan: ParallelPlan, *, quant: str, kv_cache: str = "auto") -> int:
    """planned_bytes from config.json alone (what `nim_build profiles` sizes): the sizes do not depend on which
    stored tensor the output projection comes from, so no weights are needed."""
    source = SourceModel(Path(), {}, spec, F.family_for(spec.architecture), (), None, None)  # no tensor names
    return planned_bytes(source, plan, quant=quant, kv_cache=kv_cache)


def convert_checkpoint(
    source: SourceModel,
    out_dir: str | Path,
    plan: ParallelPlan,
    *,
    quant: str = "fp8",
    kv_cache: str = "auto",
    calib_ids: torch.Tensor | None = None,
    dtype: str | None = None,
    progress: bool = False,
    hashed: bool = False,
) -> dict:
    """Write a TensorRT-LLM checkpoint (config.json + rank{r}.safetensors) into out_dir (which must exist).

    One pass over the weights: each decoder layer is read once (the next one read ahead), run through the
    calibration batch (FP8), quantized, split and written while the next group is computed.
    calib_ids: int64 [n, seq] calibration batch, required for --quant fp8. hashed: compute each file's sha256 as it
    is written (report["sha256"], by file name). Returns a small report.
    """
    out_dir = Path(out_dir)
    spec, tp = source.spec, plan.tp
    dtype = _dtype(source, quant, dtype)
    if quant == "fp8" and calib_ids is None:
        raise ValueError("FP8 conversion needs a calibration batch (calib_ids)")
    builder, head, layers, tail = _groups(source, plan, quant, kv_cache, dtype)
    all_groups = head + [g for gs in layers for g in gs] + tail
    rank_specs = [[t for g in all_groups for t in g.specs[r]] for r in range(tp)]
    writers = [StreamingWriter(out_dir / f"rank{r}.safetensors", rank_specs[r], hashed=hashed) for r in range(tp)]
    total = sum(t.nbytes for specs in rank_specs for t in specs)
    stream = _LayerStream(source.reader, source.family, spec.num_hidden_layers)
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="write")
    pending = None
    calib_s = 0.0
    bar = tqdm(total=total, desc=f"convert {quant} tp{tp}", unit="B", unit_scale=True, disable=not progress)

    def write(group: Group):
        """Produce the group here, write it on the writer thread while the caller computes the next one."""
        nonlocal pending
        tensors = group.produce()
        if pending is not None:
            pending.result()
        pending = write_pool.submit(_write_ranks, writers, tensors, bar)

    try:
        calibrator = None
        if quant == "fp8":  # embeds the batch and drops the table before the head group reads it again
            calibrator = LayerCalibrator(source, calib_ids, want_kv=kv_cache == "fp8")
        for g in head:
            write(g)
        pending.result()  # the embedding (the largest tensor) is on disk before the first layer is read
        for i, groups in enumerate(layers):
            builder.layer_weights = stream.layer(i)
            if calibrator is not None:
                t = time.monotonic()
                builder.layer_amax = calibrator.run_layer(i, builder.layer_weights)
                calib_s += time.monotonic() - t
            for g in groups:
                write(g)
        for g in tail:
            write(g)
        if pending is not None:
            pending.result()
        hashes = {w.path.name: w.close() for w in writers}
    finally:
        bar.close()
        stream.close()
        write_pool.shutdown()
    config = trtllm_config(spec, plan, quant, kv_cache, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"config": config, "bytes_written": total, "calibrate_s": calib_s, "sha256": hashes if hashed else None}


def _write_ranks(writers: list[StreamingWriter], tensors: list[dict[str, torch.Tensor]], bar) -> None:
    for r, named in enumerate(tensors):
        for name, t in named.items():
            writers[r].write(name, t)
            bar.update(t.numel() * t.element_size())
