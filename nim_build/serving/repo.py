"""Triton model repository generator: the tensorrtllm_backend in-flight batching layout (docs/FORMATS.md, section 5).

    REPO/
      ensemble/config.pbtxt + 1/            preprocessing -> tensorrt_llm -> postprocessing
      preprocessing/config.pbtxt, 1/model.py, 1/tokenizer/   (the engine's tokenizer, copied)
      tensorrt_llm/config.pbtxt [+ 1/model.py for the reference backend]
      postprocessing/config.pbtxt, 1/libtriton_nim_detokenizer.so + 1/detokenizer.bin   (native; or 1/model.py)
      tensorrt_llm_bls/config.pbtxt, 1/model.py

Configs are `ModelConfig` protobuf messages written with text_format, so they are valid by construction.
Input/output names, types and dims and parameter keys follow the upstream templates
(tensorrtllm_backend all_models/inflight_batcher_llm); `messages` / `MESSAGES` (a chat request as JSON) and
`tokenizer_dir` on tensorrt_llm_bls are this project's additions.

The tokenizer is copied into the repository (preprocessing/1/tokenizer/: inside a version folder, where Triton
looks for nothing), so the CPU-side models need nothing but the repository. `tensorrt_llm` points at the engine
directory by absolute path (`gpt_model_path`): the engine is big and lives on the serving node's model-cache
volume, and the repository is small and cheap to generate, so it is generated on the node (Helm: next to the
engine, or in an emptyDir at pod start) with the path the volume is mounted at.
Python model sources are package data (nim_build/serving/models/) and are copied as they are.

`postprocessing` runs natively by default (nim_build/serving/native: the C++ backend `nim_detokenizer`, with a token
table checked against the tokenizer here): Triton's python backend costs tens of microseconds per request, and a
streaming ensemble sends postprocessing one request per generated token. Tokenizers whose decoder is not a
concatenation of byte pieces, or a machine without a C++ compiler, get the python model (same inputs, outputs
and text).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_format

from nim_build import KV_CACHE_FREE_MEM_FRACTION
from nim_build.builder.manifest import load_manifest
from nim_build.errors import NativeBuildError, UserError
from nim_build.outputs import check_output, output_dir
from nim_build.serving import native
from nim_build.serving.tokenizer import META_FILE, REPO_TOKENIZER_DIR, Tokenizer, meta_from_manifest

MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
POSTPROCESSING = ("auto", "native", "python")
SOURCES = Path(__file__).resolve().with_name("models")  # package data: python model sources
SHARED_MODULES = ("triton_common.py",)  # copied next to every python model


@dataclass
class RepoOptions:
    model_name: str = "ensemble"
    max_batch_size: int | None = None  # default: the engine's
    instances: int = 1
    decoupled: bool = True
    # TensorRT-LLM's in-flight batching parameters, honoured by both backends or refused for one (REFERENCE_LIMITS)
    kv_cache_free_gpu_mem_fraction: float = KV_CACHE_FREE_MEM_FRACTION
    enable_kv_cache_reuse: bool | None = None  # default: on for trtllm (TensorRT-LLM's), off for reference (none)
    enable_chunked_context: bool = False
    batch_scheduler_policy: str = "guaranteed_no_evict"
    max_queue_delay_microseconds: int = 0
    # Requests tensorrt_llm holds waiting before it refuses new ones (0: no bound). For trtllm in upstream's place,
    # the dynamic batcher's default_queue_policy, which the C++ backend reads. Triton applies that bound to its own
    # queue too, and Triton 2.51 leaves an ensemble request stuck for good when its queue refuses a step
    # (triton-inference-server/core#466, fixed in 2026): harmless where execute returns at once (the C++ backend),
    # but the python model's queue fills. So for the reference backend it is the model's parameter max_queue_size.
    max_queue_size: int = 0
    exclude_input_in_output: bool = True
    postprocessing: str = "auto"  # "native" (C++ backend), "python", or "auto": native when possible
    # reference backend only: "module:Class" of the engine the python tensorrt_llm model runs
    # (default nim_build.runtime:LLMEngine; benchmarks use nim_build.testing.trivial_engine:TrivialEngine)
    engine_class: str | None = None


# (name, data type, dims, optional, scalar reshape, ragged)
T = tuple[str, str, list[int], bool, bool, bool]


def _in(name, dtype, dims, optional=True, scalar=False, ragged=False) -> T:
    return (name, dtype, dims, optional, scalar, ragged)


# Names, types and dims as upstream's templates (tensorrtllm_backend c2e65b8 all_models/inflight_batcher_llm), for
# what the reference runtime serves or answers with an error naming it; `messages` / `MESSAGES` (a chat request as
# JSON) and `stream_key` / `STREAM_KEY` (an ensemble stream's private key, see tensorrt_llm/model.py) are ours.
END_PAD_INPUTS: list[T] = [_in("end_id", "TYPE_INT32", [1]), _in("pad_id", "TYPE_INT32", [1])]
SAMPLING_INPUTS: list[T] = [  # the ensemble's and the BLS's, forwarded to tensorrt_llm under LLM_NAMES' names
    _in("top_k", "TYPE_INT32", [1]),
    _in("top_p", "TYPE_FP32", [1]),
    _in("temperature", "TYPE_FP32", [1]),
    _in("length_penalty", "TYPE_FP32", [1]),
    _in("repetition_penalty", "TYPE_FP32", [1]),
    _in("min_tokens", "TYPE_INT32", [1]),
    _in("presence_penalty", "TYPE_FP32", [1]),
    _in("frequency_penalty", "TYPE_FP32", [1]),
    _in("seed", "TYPE_UINT64", [1]),
    _in("return_log_probs", "TYPE_BOOL", [1]),
    _in("return_context_logits", "TYPE_BOOL", [1]),
    _in("return_generation_logits", "TYPE_BOOL", [1]),
    _in("return_perf_metrics", "TYPE_BOOL", [1]),
    _in("num_return_sequences", "TYPE_INT32", [1]),
    _in("beam_width", "TYPE_INT32", [1]),
    _in("stream", "TYPE_BOOL", [1]),
]
# ensemble / BLS input -> tensorrt_llm input, where the names differ
LLM_NAMES = {"top_k": "runtime_top_k", "top_p": "runtime_top_p", "length_penalty": "len_penalty", "stream": "streaming"}
ENSEMBLE_INPUTS: list[T] = [
    _in("text_input", "TYPE_STRING", [1], optional=False),
    _in("decoder_text_input", "TYPE_STRING", [1]),
    _in("max_tokens", "TYPE_INT32", [1], optional=False),
    _in("bad_words", "TYPE_STRING", [-1]),
    _in("stop_words", "TYPE_STRING", [-1]),
    _in("embedding_bias_words", "TYPE_STRING", [-1]),
    _in("embedding_bias_weights", "TYPE_FP32", [-1]),
    _in("exclude_input_in_output", "TYPE_BOOL", [1]),
    *END_PAD_INPUTS,  # preprocessing's, the tokenizer's when absent
    *SAMPLING_INPUTS,
    _in("messages", "TYPE_STRING", [1]),
]
# upstream's BLS declares these reshaped to scalars (the ensemble does not)
BLS_SCALARS = {"return_log_probs", "return_context_logits", "return_generation_logits", "return_perf_metrics"}
BLS_INPUTS: list[T] = [
    _in(n, t, d, optional=o, scalar=n in BLS_SCALARS | {"num_return_sequences"}, ragged=r)
    for n, t, d, o, _, r in ENSEMBLE_INPUTS
]
PERF_OUTPUTS = [
    *[(n, "TYPE_INT32", [1]) for n in ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks")],
    ("kv_cache_alloc_total_blocks", "TYPE_INT32", [1]),
    *[
        (n, "TYPE_INT64", [1])
        for n in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")
    ],
    ("acceptance_rate", "TYPE_FP32", [1]),
    *[(n, "TYPE_INT32", [1]) for n in ("total_accepted_draft_tokens", "total_draft_tokens")],
]
# what tensorrt_llm returns beside output_ids / sequence_length, and the ensemble and the BLS pass on
EXTRA_OUTPUTS = [
    ("cum_log_probs", "TYPE_FP32", [-1]),
    ("output_log_probs", "TYPE_FP32", [-1, -1]),
    ("context_logits", "TYPE_FP32", [-1, -1]),
    ("generation_logits", "TYPE_FP32", [-1, -1, -1]),
    ("batch_index", "TYPE_INT32", [1]),
    ("sequence_index", "TYPE_INT32", [1]),
    *PERF_OUTPUTS,
]
TEXT_OUTPUTS = [("text_output", "TYPE_STRING", [-1]), *EXTRA_OUTPUTS]

PRE_INPUTS: list[T] = [
    _in("QUERY", "TYPE_STRING", [1], optional=False),
    _in("DECODER_QUERY", "TYPE_STRING", [1]),
    _in("REQUEST_OUTPUT_LEN", "TYPE_INT32", [1], optional=False),
    _in("BAD_WORDS_DICT", "TYPE_STRING", [-1]),
    _in("STOP_WORDS_DICT", "TYPE_STRING", [-1]),
    _in("EMBEDDING_BIAS_WORDS", "TYPE_STRING", [-1]),
    _in("EMBEDDING_BIAS_WEIGHTS", "TYPE_FP32", [-1]),
    _in("END_ID", "TYPE_INT32", [1]),
    _in("PAD_ID", "TYPE_INT32", [1]),
    _in("MESSAGES", "TYPE_STRING", [1]),
]
PRE_OUTPUTS = [
    ("INPUT_ID", "TYPE_INT32", [-1]),
    ("DECODER_INPUT_ID", "TYPE_INT32", [-1]),
    ("REQUEST_INPUT_LEN", "TYPE_INT32", [1]),
    ("REQUEST_DECODER_INPUT_LEN", "TYPE_INT32", [1]),
    ("BAD_WORDS_IDS", "TYPE_INT32", [2, -1]),
    ("STOP_WORDS_IDS", "TYPE_INT32", [2, -1]),
    ("EMBEDDING_BIAS", "TYPE_FP32", [-1]),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", [-1]),
    ("OUT_END_ID", "TYPE_INT32", [1]),
    ("OUT_PAD_ID", "TYPE_INT32", [1]),
    ("STREAM_KEY", "TYPE_UINT64", [1]),  # ours: a random key per row (see tensorrt_llm/model.py)
]

LLM_INPUTS: list[T] = [
    _in("input_ids", "TYPE_INT32", [-1], ragged=True),
    _in("decoder_input_ids", "TYPE_INT32", [-1], ragged=True),  # encoder-decoder models only: unused here
    _in("draft_input_ids", "TYPE_INT32", [-1], ragged=True),
    _in("input_lengths", "TYPE_INT32", [1], optional=False, scalar=True),
    _in("decoder_input_lengths", "TYPE_INT32", [1], scalar=True),
    _in("request_output_len", "TYPE_INT32", [1], optional=False, scalar=True),
    *[
        _in(LLM_NAMES.get(name, name), dtype, dims, scalar=True)
        for name, dtype, dims, *_ in END_PAD_INPUTS + SAMPLING_INPUTS
        if name != "stream"
    ],
    _in("min_length", "TYPE_INT32", [1], scalar=True),  # min_tokens' name before tensorrtllm_backend c2e65b8
    _in("early_stopping", "TYPE_BOOL", [1], scalar=True),
    _in("stop_words_list", "TYPE_INT32", [2, -1], ragged=True),
    _in("bad_words_list", "TYPE_INT32", [2, -1], ragged=True),
    _in("embedding_bias", "TYPE_FP32", [-1], ragged=True),
    _in("exclude_input_in_output", "TYPE_BOOL", [1], scalar=True),
    _in("stop", "TYPE_BOOL", [1], scalar=True),
    _in("streaming", "TYPE_BOOL", [1], scalar=True),
]
LLM_OUTPUTS = [("output_ids", "TYPE_INT32", [-1, -1]), ("sequence_length", "TYPE_INT32", [-1]), *EXTRA_OUTPUTS]
STREAM_KEY_INPUT = _in("stream_key", "TYPE_UINT64", [1], scalar=True)
STREAM_KEY_OUTPUT = ("stream_key", "TYPE_UINT64", [1])

POST_INPUTS: list[T] = [
    _in("TOKENS_BATCH", "TYPE_INT32", [-1, -1], optional=False),
    _in("SEQUENCE_LENGTH", "TYPE_INT32", [-1], optional=False),
    _in("STREAM_KEY", "TYPE_UINT64", [1]),
]
POST_OUTPUTS = [("OUTPUT", "TYPE_STRING", [-1])]


def ensemble_steps(stream_keys: bool) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """The ensemble's wiring: (model, {model input: ensemble tensor}, {model output: ensemble tensor}).
    stream_keys: the reference backend's private stream keys, from preprocessing through tensorrt_llm to
    postprocessing."""
    pre_in = {
        "QUERY": "text_input",
        "DECODER_QUERY": "decoder_text_input",
        "REQUEST_OUTPUT_LEN": "max_tokens",
        "BAD_WORDS_DICT": "bad_words",
        "STOP_WORDS_DICT": "stop_words",
        "EMBEDDING_BIAS_WORDS": "embedding_bias_words",
        "EMBEDDING_BIAS_WEIGHTS": "embedding_bias_weights",
        "END_ID": "end_id",
        "PAD_ID": "pad_id",
        "MESSAGES": "messages",
    }
    pre_out = {name: f"_{name}" for name, *_ in PRE_OUTPUTS if name != "STREAM_KEY" or stream_keys}
    pre_out.update(OUT_END_ID="_PREPROCESSOR_END_ID", OUT_PAD_ID="_PREPROCESSOR_PAD_ID")
    llm_in = {
        "input_ids": "_INPUT_ID",
        "decoder_input_ids": "_DECODER_INPUT_ID",
        "input_lengths": "_REQUEST_INPUT_LEN",
        "decoder_input_lengths": "_REQUEST_DECODER_INPUT_LEN",
        "request_output_len": "_REQUEST_OUTPUT_LEN",
        "exclude_input_in_output": "exclude_input_in_output",
        "end_id": "_PREPROCESSOR_END_ID",
        "pad_id": "_PREPROCESSOR_PAD_ID",
        "stop_words_list": "_STOP_WORDS_IDS",
        "bad_words_list": "_BAD_WORDS_IDS",
        "embedding_bias": "_EMBEDDING_BIAS",
    }
    llm_in.update({LLM_NAMES.get(name, name): name for name, *_ in SAMPLING_INPUTS})
    llm_out = {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}
    llm_out.update({name: name for name, *_ in EXTRA_OUTPUTS})
    post_in = {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"}
    if stream_keys:  # preprocessing's random key -> tensorrt_llm -> each stream's key -> postprocessing
        llm_in["stream_key"] = "_STREAM_KEY"
        llm_out["stream_key"] = "_STREAM_KEY_OUT"
        post_in["STREAM_KEY"] = "_STREAM_KEY_OUT"
    return [
        ("preprocessing", pre_in, pre_out),
        ("tensorrt_llm", llm_in, llm_out),
        ("postprocessing", post_in, {"OUTPUT": "text_output"}),
    ]


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _add_io(cfg, inputs: list[T], outputs) -> None:
    pb = _pb()
    for name, dtype, dims, optional, scalar, ragged in inputs:
        i = cfg.input.add(
            name=name, data_type=pb.DataType.Value(dtype), dims=dims, optional=optional, allow_ragged_batch=ragged
        )
        if scalar:
            i.reshape.SetInParent()  # reshape: { shape: [ ] }
    for name, dtype, dims in outputs:
        cfg.output.add(name=name, data_type=pb.DataType.Value(dtype), dims=dims)


def _params(cfg, params: dict[str, object]) -> None:
    for key, value in params.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        cfg.parameters[key].string_value = str(value)


def _base(name: str, max_batch_size: int, *, backend: str | None = None, platform: str | None = None):
    cfg = _pb().ModelConfig(name=name, max_batch_size=max_batch_size)
    if backend:
        cfg.backend = backend
    if platform:
        cfg.platform = platform
    return cfg


def _instances(cfg, count: int) -> None:
    cfg.instance_group.add(count=count, kind=_pb().ModelInstanceGroup.KIND_CPU)


# What the reference runtime cannot do of TensorRT-LLM's options: (option, refused value, why). Each is an error
# for a reference engine, never a setting written into its config and ignored.
REFERENCE_LIMITS = (
    ("enable_kv_cache_reuse", True, "the reference runtime has no KV-cache reuse; drop --enable-kv-cache-reuse"),
    (
        "batch_scheduler_policy",
        "max_utilization",
        "the reference runtime schedules guaranteed_no_evict only; drop --batch-scheduler-policy max_utilization",
    ),
)


def refused_for_reference(values: dict) -> str | None:
    """Why the reference runtime cannot take these tensorrt_llm settings (RepoOptions values, or a config's
    parameter strings), or None. One table for `nim_build repo` and for the python tensorrt_llm model at load."""
    for name, refused, why in REFERENCE_LIMITS:
        value = values.get(name)
        if value is not None and str(value).lower() == str(refused).lower():
            return f"{name} {value}: {why}"
    return None


def reference_queue_bound(cfg: dict) -> int:
    """The python tensorrt_llm model's max_queue_size, from its config as Triton passes it (JSON): its parameter
    (RepoOptions.max_queue_size says why not Triton's queue policy, which is refused here)."""
    if int(cfg.get("dynamic_batching", {}).get("default_queue_policy", {}).get("max_queue_size", 0)):
        raise UserError(
            "dynamic_batching.default_queue_policy.max_queue_size: Triton 2.51 leaves an ensemble request unfinished "
            "when that queue refuses a step; bound the reference engine's queue with the parameter max_queue_size "
            "instead (nim_build repo --max-queue-size)"
        )
    return int(cfg.get("parameters", {}).get("max_queue_size", {}).get("string_value") or 0)


def build_configs(manifest: dict, engine_dir: Path, opts: RepoOptions) -> dict[str, object]:
    """The five ModelConfig messages for an engine, keyed by model directory name."""
    backend = manifest["backend"]
    if backend == "onnx":
        raise UserError(
            f"{engine_dir} is an onnx build, which Triton does not serve yet: run its onnx/ directory with "
            "onnxruntime-genai (`onnxruntime_genai.Model(dir)`), or rebuild with --backend reference or trtllm"
        )
    if backend not in ("trtllm", "reference"):
        raise UserError(f"engine backend {backend!r} is not servable; expected 'trtllm' or 'reference'")
    if opts.batch_scheduler_policy not in SCHEDULER_POLICIES:
        raise UserError(f"--batch-scheduler-policy must be one of {', '.join(SCHEDULER_POLICIES)}")
    if backend == "reference" and (why := refused_for_reference(vars(opts))):
        raise UserError(why)
    kv_reuse = opts.enable_kv_cache_reuse if opts.enable_kv_cache_reuse is not None else backend == "trtllm"
    if not 0.0 < opts.kv_cache_free_gpu_mem_fraction <= 1.0:
        raise UserError("--kv-cache-free-gpu-mem-fraction must be in (0, 1]")
    if opts.instances < 1:
        raise UserError("--instances must be at least 1")
    engine_max_batch = int(manifest["build"]["max_batch_size"])
    mbs = opts.max_batch_size or engine_max_batch
    if not 1 <= mbs <= engine_max_batch:
        raise UserError(f"--max-batch-size {mbs} is outside 1..{engine_max_batch} (the engine's max batch size)")
    tokenizer_dir = REPO_TOKENIZER_DIR  # resolved against the repository root by the python models
    configs = {}

    pre = _base("preprocessing", mbs, backend="python")
    _add_io(pre, PRE_INPUTS, PRE_OUTPUTS)
    pre.dynamic_batching.SetInParent()
    _instances(pre, opts.instances)
    _params(pre, {"tokenizer_dir": tokenizer_dir, "add_special_tokens": True})
    configs["preprocessing"] = pre

    post = _base("postprocessing", mbs, backend=native.BACKEND if opts.postprocessing == "native" else "python")
    _add_io(post, POST_INPUTS, POST_OUTPUTS)
    # In a streaming ensemble every partial response of a request goes through postprocessing, which keeps
    # the request's incremental detokenizer: one instance, in order (no dynamic batcher: it would also drop the
    # cancelled steps that postprocessing turns into a `stop` for tensorrt_llm).
    if opts.decoupled:
        _instances(post, 1)
    else:
        post.dynamic_batching.preserve_ordering = True
        _instances(post, opts.instances)
    post_params: dict[str, object] = {"tensorrt_llm_model_name": "tensorrt_llm"}
    if opts.postprocessing != "native":  # native: the tokenizer is compiled into 1/detokenizer.bin
        post_params.update(tokenizer_dir=tokenizer_dir, skip_special_tokens=True)
    _params(post, post_params)
    configs["postprocessing"] = post

    llm = _base("tensorrt_llm", mbs, backend="tensorrtllm" if backend == "trtllm" else "python")
    llm.model_transaction_policy.decoupled = opts.decoupled
    llm.dynamic_batching.preferred_batch_size.append(mbs)
    llm.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_microseconds
    reference = backend == "reference"
    if not reference:  # see RepoOptions.max_queue_size
        llm.dynamic_batching.default_queue_policy.max_queue_size = opts.max_queue_size
    _add_io(llm, LLM_INPUTS + [STREAM_KEY_INPUT] * reference, LLM_OUTPUTS + [STREAM_KEY_OUTPUT] * reference)
    _instances(llm, 1)
    engine_dir = Path(engine_dir).resolve()
    llm_params: dict[str, object] = {
        "max_beam_width": 1,
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": str(engine_dir / "engine") if backend == "trtllm" else str(engine_dir),
        "batch_scheduler_policy": opts.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": opts.kv_cache_free_gpu_mem_fraction,
        "enable_kv_cache_reuse": kv_reuse,
        "enable_chunked_context": opts.enable_chunked_context,
        "exclude_input_in_output": opts.exclude_input_in_output,
    }
    if reference and opts.max_queue_size:
        llm_params["max_queue_size"] = opts.max_queue_size
    if reference and opts.engine_class:
        llm_params["nim_build_engine"] = opts.engine_class
    if backend == "trtllm":
        llm_params.update(
            {
                "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
                "executor_worker_path": "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker",
            }
        )
    _params(llm, llm_params)
    configs["tensorrt_llm"] = llm

    bls = _base("tensorrt_llm_bls", mbs, backend="python")
    bls.model_transaction_policy.decoupled = opts.decoupled
    _add_io(bls, BLS_INPUTS, TEXT_OUTPUTS)
    _instances(bls, opts.instances)
    _params(
        bls, {"accumulate_tokens": False, "tensorrt_llm_model_name": "tensorrt_llm", "tokenizer_dir": tokenizer_dir}
    )
    configs["tensorrt_llm_bls"] = bls

    ens = _base(opts.model_name, mbs, platform="ensemble")
    _add_io(ens, ENSEMBLE_INPUTS, TEXT_OUTPUTS)
    for model, inputs, outputs in ensemble_steps(stream_keys=reference):
        step = ens.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        for k, v in inputs.items():
            step.input_map[k] = v
        for k, v in outputs.items():
            step.output_map[k] = v
    configs["ensemble"] = ens
    return configs


def _native_postprocessing(mode: str, tok_dir: Path, meta: dict) -> tuple[Path, list[bytes], bool] | None:
    """(library, token pieces, strip leading space) for the native postprocessing, or None for the python one."""
    if mode not in POSTPROCESSING:
        raise UserError(f"--postprocessing must be one of {', '.join(POSTPROCESSING)}, got {mode!r}")
    if mode == "python":
        return None
    table = Tokenizer.from_dir(tok_dir, meta).byte_pieces()
    if table is None:
        reason = "this tokenizer's decoder is not a concatenation of token bytes"
        if mode == "native":
            raise UserError(f"--postprocessing native: {reason}; use --postprocessing python")
        print(f"note: postprocessing runs in python: {reason}", file=sys.stderr)
        return None
    try:
        library = native.build_detokenizer()
    except NativeBuildError as e:
        if mode == "native":
            raise
        print(f"note: postprocessing runs in python: {e}", file=sys.stderr)
        return None
    return library, *table


def write_config(cfg, path: Path) -> None:
    path.write_text(text_format.MessageToString(cfg))


def read_config(path: str | os.PathLike):
    """Parse a config.pbtxt into a ModelConfig message (raises on any invalid field)."""
    return read_config_text(Path(path).read_text())


def read_config_text(text: str):
    return text_format.Parse(text, _pb().ModelConfig())


# Triton model names become directory names in the repository: a plain name, not a path.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str) -> None:
    if not MODEL_NAME.match(name or ""):
        raise UserError(
            f"--model-name {name!r} is not a Triton model name: letters, digits, '_', '.' and '-', "
            "starting with a letter or digit, at most 128"
        )
    if name in MODELS[1:]:
        raise UserError(
            f"--model-name {name!r} is the name of one of the repository's own models "
            f"({', '.join(MODELS[1:])}); choose another"
        )


def generate_repo(
    engine_dir: str | os.PathLike, out: str | os.PathLike, opts: RepoOptions | None = None, *, force: bool = False
) -> Path:
    """Write a Triton model repository for an engine directory; returns the repository path."""
    opts = opts or RepoOptions()
    engine_dir = Path(engine_dir)
    out = Path(out)
    check_model_name(opts.model_name)
    check_output(out, force, protect=(engine_dir,))
    manifest = load_manifest(engine_dir)
    tok_src = engine_dir / manifest["tokenizer"].get("dir", "tokenizer")
    if not tok_src.is_dir():
        raise UserError(f"{tok_src} not found: the engine directory has no tokenizer")
    meta = meta_from_manifest(manifest)
    native_post = _native_postprocessing(opts.postprocessing, tok_src, meta)
    opts = replace(opts, postprocessing="native" if native_post else "python")
    configs = build_configs(manifest, engine_dir, opts)

    with output_dir(out, force, protect=(engine_dir,)) as tmp:
        for dirname, cfg in configs.items():
            mdir = tmp / (opts.model_name if dirname == "ensemble" else dirname)
            (mdir / "1").mkdir(parents=True)
            write_config(cfg, mdir / "config.pbtxt")
            if cfg.backend == "python":
                shutil.copy(SOURCES / dirname / "model.py", mdir / "1" / "model.py")
                for mod in SHARED_MODULES:
                    shutil.copy(SOURCES / mod, mdir / "1" / mod)
        if native_post:
            library, pieces, strip = native_post
            shutil.copy(library, tmp / "postprocessing" / "1" / native.LIBRARY)
            native.write_table(tmp / "postprocessing" / "1" / native.TABLE_FILE, pieces, strip)
        tok_dst = tmp / REPO_TOKENIZER_DIR
        shutil.copytree(tok_src, tok_dst)
        (tok_dst / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
