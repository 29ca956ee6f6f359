"""The TensorRT-LLM checkpoint as an ONNX decoder (`--backend onnx`), written without reading the weights.

One quantization, two writers: this module reads the checkpoint convert.py has just written and never quantizes
again. The external-data file *is* the checkpoint's rank0.safetensors: the file moves to onnx/model.onnx.data and
checkpoint/rank0.safetensors becomes a relative symlink to it (onnx.checker refuses a data file with several hard
links). Every weight initializer points at its tensor's bytes inside it (safetensors stores raw little-endian data,
as ONNX external data does), so an FP8 weight of the graph is the checkpoint's, byte for byte, and a 12B export
costs no second copy of its 13 GB. Only the graph is built in memory (nodes and small constants, under a
few MB), so the 2 GB protobuf limit never applies.

The graph is onnxruntime-genai's decoder contract (genai_config.json beside it; `onnxruntime_genai.Model(dir)` loads
it): inputs input_ids, attention_mask, position_ids [batch, seq] int64 and past_key_values.{i}.key|value [batch,
kv_heads, past, head_size]; outputs logits (float32) and present.{i}.key|value. Standard ONNX ops only, opset 21
(float8 needs >= 19), so ONNX Runtime's CPU kernels and TensorRT's parser both take it:

    FP8 (per tensor)   DequantizeLinear(W_fp8, s_w) -> Transpose -> MatMul(DequantizeLinear(QuantizeLinear(x, s_a)))
                       the Q/DQ pattern TensorRT fuses into an FP8 GEMM; s_w, s_a the checkpoint's scales
    fp8-pc-pt          DequantizeLinear(W_fp8, s_w[out], axis=0); activations rounded per token (amax / 448) with
                       Cast ops (no standard ONNX op quantizes per token at run time)
    unquantized        MatMul(x, Transpose(W))

Weights keep the checkpoint's [out, in] layout (hence the Transpose, folded by both runtimes). What HF computes in
float32 (RMSNorm's statistics, the rotary angles, the softmax) is computed in float32 here too; the rotary angles are
computed from position_ids in the graph, so no table bounds the positions.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from nim_build import __version__
from nim_build.builder.safetensors_io import CheckpointReader
from nim_build.errors import ConfigError
from nim_build.options import FP8_QUANTS, UNQUANTIZED_DTYPES
from nim_build.runtime.fp8 import FP8_MAX

OPSET = 21
IR_VERSION = 10
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
CHECKPOINT_FILE = "rank0.safetensors"  # what DATA_FILE links to (tp 1)
# The checkpoint dtype of an onnx build, by --quant. FP8 computes in float16: ONNX Runtime has no bfloat16 CPU
# kernels (so a bfloat16 graph could not be checked here) and float16 is what TensorRT's FP8 ONNX path runs.
ONNX_DTYPES = {**UNQUANTIZED_DTYPES, **{q: "float16" for q in FP8_QUANTS}}
# What ONNX Runtime's CPU kernels run, so what the build can check with it.
ORT_CPU_DTYPES = ("float32", "float16")


def _onnx_types():
    from onnx import TensorProto as T

    return {
        "float32": T.FLOAT,
        "float16": T.FLOAT16,
        "bfloat16": T.BFLOAT16,
        "F32": T.FLOAT,
        "F16": T.FLOAT16,
        "BF16": T.BFLOAT16,
        "F8_E4M3": T.FLOAT8E4M3FN,
        "float8_e4m3fn": T.FLOAT8E4M3FN,
        "int64": T.INT64,
        "bool": T.BOOL,
    }


def check_supported(*, quant: str, kv_cache: str, tp: int) -> None:
    """Refuse, before any work, a build the ONNX writer cannot express."""
    if tp != 1:
        raise ConfigError(f"--backend onnx writes one graph for one device; --tp {tp} needs --backend trtllm")
    if kv_cache != "auto":
        raise ConfigError("--backend onnx keeps the KV cache in the compute dtype; pass --kv-cache auto")
    if quant not in ONNX_DTYPES:
        raise ConfigError(f"--backend onnx: --quant {quant} is not one of {', '.join(ONNX_DTYPES)}")
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--backend onnx needs {' and '.join(missing)}: pip install 'nim_build[onnx]'")


def _raw(t: torch.Tensor) -> bytes:
    """The little-endian bytes of t, as ONNX's raw_data holds them (bfloat16 and float8 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class _Graph:
    """Nodes and initializers under construction; a node's output is named after the node."""

    def __init__(self):
        self.types = _onnx_types()
        self.nodes, self.inits, self.n = [], [], 0
        self.const_cache: dict = {}

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        from onnx import helper

        self.n += 1
        base = name or f"/{op_type}_{self.n}"
        outs = [base] if outputs == 1 and name else [f"{base}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{base}/node", **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype: str) -> str:
        """A small constant, made once: a scalar or list, in dtype (a torch dtype name: "float32", "int64", ...)."""
        key = (str(value), dtype)
        if key not in self.const_cache:
            t = torch.tensor(value, dtype=getattr(torch, dtype))
            name = f"/const_{len(self.const_cache)}"
            self.add(name, t)
            self.const_cache[key] = name
        return self.const_cache[key]

    def add(self, name: str, t: torch.Tensor) -> str:
        """A constant computed here (scales in the compute dtype, rotary frequencies), kept in the graph."""
        from onnx import TensorProto

        data_type = self.types[str(t.dtype).removeprefix("torch.")]
        self.inits.append(TensorProto(name=name, data_type=data_type, dims=list(t.shape), raw_data=_raw(t)))
        return name


class _Decoder:
    """Builds the graph of one checkpoint (tp 1)."""

    def __init__(self, ckpt_dir: Path):
        self.cfg = cfg = json.loads((ckpt_dir / "config.json").read_text())
        self.reader = CheckpointReader(ckpt_dir)
        self.dtype = cfg["dtype"]
        self.quant_algo = cfg["quantization"]["quant_algo"]
        self.g = _Graph()
        self.t = self.g.types[self.dtype]
        self.heads, self.kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.head_size = cfg["head_size"]
        self.hidden_states: list[str] = []  # what the accuracy gate compares with HF's output_hidden_states

    def weight(self, name: str, as_name: str | None = None) -> str:
        """A checkpoint tensor: an initializer pointing at its bytes in the shared data file."""
        from onnx import TensorProto

        path, offset, length = self.reader.location(name)
        assert path.name == CHECKPOINT_FILE, path
        out = as_name or name
        t = TensorProto(name=out, data_type=self.g.types[self.reader.dtype(name)], dims=self.reader.shape(name))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.g.inits.append(t)
        return out

    def scale(self, name: str) -> str:
        """A checkpoint scale in the compute dtype (a scalar for [1], else the vector)."""
        t = self.reader.get(name).float()
        t = t.reshape(()) if t.numel() == 1 else t
        return self.g.add(name, t.to(getattr(torch, self.dtype)))

    # -- building blocks ---------------------------------------------------------------------------------------
    def linear(self, x: str, prefix: str) -> str:
        g = self.g
        w = self.weight(prefix + ".weight")
        if self.quant_algo == "FP8":
            s_w, s_a = self.scale(prefix + ".weights_scaling_factor"), self.scale(prefix + ".activation_scaling_factor")
            zero = g.const(0.0, "float8_e4m3fn")  # the zero point that makes QuantizeLinear output float8
            x = g.op("DequantizeLinear", g.op("QuantizeLinear", x, s_a, zero), s_a)
            w = g.op("DequantizeLinear", w, s_w)
        elif self.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN":
            w = g.op("DequantizeLinear", w, self.scale(prefix + ".per_channel_scale"), axis=0)
            x = self.per_token_round(x)
        return g.op("MatMul", x, g.op("Transpose", w, perm=[1, 0]), name=prefix + "/MatMul")

    def per_token_round(self, x: str) -> str:
        """x rounded to the FP8 grid of its own per-token scale amax / 448 (float32, as the reference runtime)."""
        g = self.g
        x32 = g.op("Cast", x, to=g.types["float32"])
        amax = g.op("ReduceMax", g.op("Abs", x32), g.const([-1], "int64"), keepdims=1)
        s = g.op("Max", g.op("Div", amax, g.const(FP8_MAX, "float32")), g.const(1e-12, "float32"))
        q = g.op("Cast", g.op("Div", x32, s), to=g.types["F8_E4M3"], saturate=1)
        back = g.op("Mul", g.op("Cast", q, to=g.types["float32"]), s)
        return g.op("Cast", back, to=self.t)

    def rms_norm(self, x: str, weight: str, name: str) -> str:
        """transformers' RMSNorm: statistics in float32, the weight applied in the model dtype."""
        g = self.g
        x32 = g.op("Cast", x, to=g.types["float32"])
        var = g.op("ReduceMean", g.op("Mul", x32, x32), g.const([-1], "int64"), keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(self.cfg["norm_epsilon"], "float32"))))
        normed = g.op("Cast", g.op("Mul", x32, inv), to=self.t)
        return g.op("Mul", self.weight(weight), normed, name=name)

    def rotary(self, position_ids: str) -> tuple[str, str]:
        """cos and sin [batch, 1, seq, head_size] of the positions, as transformers computes them: angles
        position * inv_freq in float32, both halves the same, cos and sin cast to the model dtype."""
        from nim_build.runtime import rope

        g = self.g
        inv = g.add("inv_freq", rope.inv_freq(self.head_size, self.cfg["rotary_base"], self.cfg["rotary_scaling"]))
        pos = g.op("Unsqueeze", g.op("Cast", position_ids, to=g.types["float32"]), g.const([-1], "int64"))
        angles = g.op("Mul", pos, inv)  # [batch, seq, head_size / 2]
        emb = g.op("Unsqueeze", g.op("Concat", angles, angles, axis=-1), g.const([1], "int64"))
        cos = g.op("Cast", g.op("Cos", emb), to=self.t, name="/model/rotary_emb/cos")
        sin = g.op("Cast", g.op("Sin", emb), to=self.t, name="/model/rotary_emb/sin")
        return cos, sin

    def rotate(self, x: str, cos: str, sin: str) -> str:
        """x * cos + rotate_half(x) * sin, x [batch, heads, seq, head_size]."""
        g = self.g
        half = self.head_size // 2
        x1, x2 = g.op("Split", x, g.const([half, half], "int64"), axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def attention_bias(self, input_ids: str, mask: str) -> str:
        """float32 [batch, 1, groups * seq, total]: 0 where query s may see key t (t <= past + s and the mask),
        the float32 minimum elsewhere; rows repeated per query head of a KV head, the order of `attention`."""
        g = self.g
        i64 = lambda v: g.const(v, "int64")  # noqa: E731
        seq = g.op("Gather", g.op("Shape", input_ids), i64(1), axis=0)
        total = g.op("Gather", g.op("Shape", mask), i64(1), axis=0)
        keys = g.op("Range", i64(0), total, i64(1))
        queries = g.op("Range", g.op("Sub", total, seq), total, i64(1))
        causal = g.op("LessOrEqual", g.op("Unsqueeze", keys, i64([0])), g.op("Unsqueeze", queries, i64([1])))
        padded = g.op("Unsqueeze", g.op("Cast", mask, to=g.types["bool"]), i64([1, 2]))
        allowed = g.op("And", g.op("Unsqueeze", causal, i64([0, 1])), padded)
        bias = g.op("Where", allowed, g.const(0.0, "float32"), g.const(torch.finfo(torch.float32).min, "float32"))
        return g.op("Tile", bias, i64([1, 1, self.heads // self.kv_heads, 1]))

    def attention(self, x: str, i: int, cos: str, sin: str, bias: str) -> str:
        g, D, H, KV = self.g, self.head_size, self.heads, self.kv_heads
        i64 = lambda v: g.const(v, "int64")  # noqa: E731
        p = f"transformer.layers.{i}.attention"
        qkv = self.linear(x, p + ".qkv")
        q, k, v = g.op("Split", qkv, i64([H * D, KV * D, KV * D]), axis=-1, outputs=3)

        def heads(t, n):  # [batch, seq, n * D] -> [batch, n, seq, D]
            return g.op("Transpose", g.op("Reshape", t, i64([0, 0, n, D])), perm=[0, 2, 1, 3])

        q, k, v = self.rotate(heads(q, H), cos, sin), self.rotate(heads(k, KV), cos, sin), heads(v, KV)
        keys = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, name=f"present.{i}.key")
        values = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, name=f"present.{i}.value")
        # Grouped-query attention without repeating the KV heads: the query heads of one KV head, stacked.
        grouped = g.op("Reshape", q, i64([0, KV, -1, D]))
        scores = g.op("MatMul", grouped, g.op("Transpose", keys, perm=[0, 1, 3, 2]))
        scores = g.op("Mul", scores, g.const(1.0 / math.sqrt(D), self.dtype))
        probs = g.op("Softmax", g.op("Add", g.op("Cast", scores, to=g.types["float32"]), bias), axis=-1)
        ctx = g.op("MatMul", g.op("Cast", probs, to=self.t), values)  # [batch, KV, groups * seq, D]
        ctx = g.op("Transpose", g.op("Reshape", ctx, i64([0, H, -1, D])), perm=[0, 2, 1, 3])
        return self.linear(g.op("Reshape", ctx, i64([0, 0, H * D])), p + ".dense")

    def mlp(self, x: str, i: int) -> str:
        g, p = self.g, f"transformer.layers.{i}.mlp"
        fc = self.linear(x, p + ".fc")  # HF gate_proj, the SiLU branch
        act = g.op("Mul", fc, g.op("Sigmoid", fc))
        return self.linear(g.op("Mul", act, self.linear(x, p + ".gate")), p + ".proj")

    # -- the model -------------------------------------------------------------------------------------------
    def build(self):
        from onnx import TensorProto, helper

        g, cfg = self.g, self.cfg
        n_layers, KV, D = cfg["num_hidden_layers"], self.kv_heads, self.head_size
        inputs = [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", dim])
            for n, dim in (
                ("input_ids", "sequence_length"),
                ("attention_mask", "total_sequence_length"),
                ("position_ids", "sequence_length"),
            )
        ]
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", "vocab"])
        ]
        for i in range(n_layers):
            for kind in ("key", "value"):
                inputs.append(
                    helper.make_tensor_value_info(
                        f"past_key_values.{i}.{kind}", self.t, ["batch_size", KV, "past_sequence_length", D]
                    )
                )
                outputs.append(
                    helper.make_tensor_value_info(
                        f"present.{i}.{kind}", self.t, ["batch_size", KV, "total_sequence_length", D]
                    )
                )
        embedding = self.weight("transformer.vocab_embedding.weight", "model.embed_tokens.weight")
        x = g.op("Gather", embedding, "input_ids", axis=0, name="/model/embed_tokens/Gather")
        self.hidden_states.append(x)
        cos, sin = self.rotary("position_ids")
        bias = self.attention_bias("input_ids", "attention_mask")
        for i in range(n_layers):
            p = f"transformer.layers.{i}."
            h = self.rms_norm(x, p + "input_layernorm.weight", f"/model/layers.{i}/input_layernorm")
            x = g.op("Add", x, self.attention(h, i, cos, sin, bias))
            h = self.rms_norm(x, p + "post_layernorm.weight", f"/model/layers.{i}/post_attention_layernorm")
            x = g.op("Add", x, self.mlp(h, i), name=f"/model/layers.{i}/output")
            if i < n_layers - 1:
                self.hidden_states.append(x)
        x = self.rms_norm(x, "transformer.ln_f.weight", "/model/norm")
        self.hidden_states.append(x)
        head = embedding if cfg["tie_word_embeddings"] else self.weight("lm_head.weight")
        logits = g.op("MatMul", x, g.op("Transpose", head, perm=[1, 0]))
        if cfg["vocab_size"] != self.reader.shape("lm_head.weight")[0]:  # a padded vocabulary
            vocab = [g.const([0], "int64"), g.const([cfg["vocab_size"]], "int64"), g.const([-1], "int64")]
            logits = g.op("Slice", logits, *vocab)
        g.op("Cast", logits, to=TensorProto.FLOAT, name="logits")
        graph = helper.make_graph(g.nodes, "nim_build_decoder", inputs, outputs, g.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="nim_build",
            producer_version=__version__,
        )
        return model


def genai_config(cfg: dict, *, max_seq_len: int, bos_id, end_ids: list[int], pad_id) -> dict:
    """onnxruntime-genai's genai_config.json for the graph (past and present buffers not shared: the graph
    concatenates the cache with standard ops)."""
    return {
        "model": {
            "bos_token_id": bos_id,
            "context_length": max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": cfg["head_size"],
                "hidden_size": cfg["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg["num_attention_heads"],
                "num_hidden_layers": cfg["num_hidden_layers"],
                "num_key_value_heads": cfg["num_key_value_heads"],
            },
            "eos_token_id": end_ids[0] if len(end_ids) == 1 else end_ids,
            "pad_token_id": pad_id if pad_id is not None else end_ids[0],
            "type": "llama" if cfg["architecture"] == "LlamaForCausalLM" else "mistral",
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "do_sample": False,
            "max_length": max_seq_len,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def export_onnx(
    ckpt_dir: str | Path, out_dir: str | Path, *, max_seq_len: int, bos_id, end_ids: list[int], pad_id
) -> dict:
    """Write out_dir/{model.onnx, model.onnx.data, genai_config.json} from the checkpoint in ckpt_dir, whose
    rank0.safetensors becomes model.onnx.data (the special token ids and max_seq_len go to genai_config.json).
    Returns what the manifest records: files, opset, IR version, counts, where the data file came from."""
    import onnx

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    out_dir.mkdir(exist_ok=True)
    decoder = _Decoder(ckpt_dir)
    try:
        model = decoder.build()
    finally:
        decoder.reader.close()
    data = out_dir / DATA_FILE
    os.replace(ckpt_dir / CHECKPOINT_FILE, data)
    os.symlink(os.path.relpath(data, ckpt_dir), ckpt_dir / CHECKPOINT_FILE)
    (out_dir / MODEL_FILE).write_bytes(model.SerializeToString())
    config = genai_config(decoder.cfg, max_seq_len=max_seq_len, bos_id=bos_id, end_ids=end_ids, pad_id=pad_id)
    (out_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {
        "model_file": MODEL_FILE,
        "data_file": DATA_FILE,
        "data": f"the checkpoint's {CHECKPOINT_FILE} (checkpoint/{CHECKPOINT_FILE} links to it)",
        "graph_bytes": (out_dir / MODEL_FILE).stat().st_size,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "dtype": decoder.dtype,
        "quant_algo": decoder.quant_algo,
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "hidden_states": decoder.hidden_states,
        "onnx": onnx.__version__,
    }
