"""The engine directory and its manifest: the contract between `nim_build engine` and every later stage.

Layout of an engine directory (``nim_build engine MODEL --out DIR``)::

    DIR/
      checkpoint/config.json           TensorRT-LLM checkpoint config (docs/FORMATS.md, section 3)
      checkpoint/rank{r}.safetensors   one file per tensor-parallel rank
      engine/config.json, rank{r}.engine   only for backend "trtllm"
      onnx/model.onnx, model.onnx.data     only for backend "onnx": the decoder graph + its tensors (the
                                           checkpoint's rank0.safetensors, which links there), with
      onnx/genai_config.json, tokenizer    onnxruntime-genai's config and the tokenizer (a genai model directory);
      onnx/model.plan                      the TensorRT engine built from it (--tensorrt)
      tokenizer/                       tokenizer.json / tokenizer_config.json / tekken.json / generation_config.json ...
      manifest.json                    written last: a directory with a manifest is complete

manifest.json keys (all present; values null where not applicable)::

    format          "nim_build.engine"
    format_version  1
    name            engine name (default: the output directory's name)
    backend         "trtllm" | "reference" | "onnx"  (what runs it: TensorRT-LLM C++ backend, nim_build.runtime,
                    or ONNX Runtime / TensorRT)
    model           {source, revision, local_dir, architecture, input_files: {relpath: sha256}}
    spec            {architecture, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                     num_key_value_heads, head_size, intermediate_size, max_position_embeddings,
                     rotary_base, rotary_scaling, norm_epsilon, tie_word_embeddings, dtype}
    build           {options: every portable build option (nim_build.options, what `nim_build chart` reads),
                     converter_version, quant, quant_algo, kv_cache, kv_cache_quant_algo, tp, pp, world_size,
                     max_batch_size, max_seq_len (resolved), max_input_len, max_num_tokens, calib_samples,
                     calib_seq_len, calib_data, parallel_plan, trtllm_build_config}
    onnx            backend "onnx": {model_file, data_file, data, graph_bytes, opset, ir_version, dtype, quant_algo,
                    nodes, initializers, onnx, trtexec, tensorrt (the TensorRT build, or absent)}; else null
    tokenizer       {dir: "tokenizer", kind: "hf" | "tekken", bos_id, end_id, pad_id, chat_template: bool}
    versions        {nim_build, torch, transformers, tensorrt_llm_target, tensorrt_llm (null unless built),
                    onnx and onnxruntime (backend "onnx")}
    gpu             {name, compute_capability, arch} or null when built without a GPU
    outputs         {relpath: sha256} for every file in the directory except manifest.json
    timings_s       {resolve, calibrate, convert, engine, accuracy, total}
    peak_rss_bytes  peak resident memory of the build process
    accuracy        the accuracy-gate report or null
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nim_build.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "nim_build.engine"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
ENGINE_DIR = "engine"
TOKENIZER_DIR = "tokenizer"
ONNX_DIR = "onnx"


def sha256_file(path: str | os.PathLike, bufsize: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def hash_files(root: str | os.PathLike, paths: list[Path]) -> dict[str, str]:
    """sha256 of each path, keyed by posix path relative to root; files hashed in parallel (hashlib releases
    the GIL), which halves the time spent hashing a 25 GB checkpoint on two cores."""
    root = Path(root)
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        digests = pool.map(sha256_file, paths)
    return {p.relative_to(root).as_posix(): d for p, d in zip(paths, digests)}


def hash_tree(
    root: str | os.PathLike, exclude: tuple[str, ...] = (MANIFEST,), known: dict[str, str] | None = None
) -> dict[str, str]:
    """sha256 of every file under root, keyed by posix relative path, sorted; `known` digests (of files just
    verified against them) are taken instead of reading those files again."""
    root, known = Path(root), known or {}
    kept = {p: p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()}
    kept = {p: r for p, r in kept.items() if r not in exclude}
    digests = hash_files(root, [p for p, r in kept.items() if r not in known])
    return dict(sorted({**digests, **{r: known[r] for r in kept.values() if r in known}}.items()))


def write_manifest(engine_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write manifest.json atomically (temp file + rename): it is the last file of a complete directory."""
    path = Path(engine_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(engine_dir: str | os.PathLike) -> dict:
    """Read an engine directory's manifest; a missing one means an incomplete or foreign directory."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{engine_dir} is not a complete nim_build engine directory (no {MANIFEST}); "
            f"build one with `nim_build engine MODEL --out {engine_dir}`"
        )
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise UserError(f"{path} is not a nim_build engine manifest (format={data.get('format')!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format_version {data['format_version']}; upgrade nim_build to read it")
    return data
