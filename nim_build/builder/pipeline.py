"""`nim_build engine`: the build pipeline, one stage after the other, each handed what the earlier ones found.

    resolve   MODEL -> a local directory (hub download, the embedded default, pickle refused)   resolve.py
    open      config.json, family, weights and tokenizer, opened and checked once             source.py
    plan      tensor-parallel split; max_seq_len; the engine backend                          plan.py, backends.py
    convert   calibrate + quantize + write the TensorRT-LLM checkpoint, one pass, streamed    convert.py
    onnx      the checkpoint as an ONNX graph, checked (onnx backend only)                    onnx_export.py, _verify.py
    accuracy  the checkpoint (or the ONNX graph) against transformers' own forward pass (FP8) accuracy.py
    engine    TensorRT-LLM engine (trtllm); TensorRT engine from the graph (onnx, --tensorrt)  trtllm_adapter.py,
                                                                                              tensorrt_adapter.py
    manifest  written last                                                                    manifest.py

Everything is written into a temporary sibling of the output directory, which is renamed into place when
complete (nim_build/outputs.py); manifest.json is its last file. A build killed at any point (SIGKILL included)
leaves at most a `.<name>.partial-<pid>-*` directory, which the next build removes.
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nim_build import TRTLLM_VERSION, __version__, limits
from nim_build.builder.manifest import (
    CHECKPOINT_DIR,
    ENGINE_DIR,
    ONNX_DIR,
    TOKENIZER_DIR,
    hash_files,
    hash_tree,
    write_manifest,
)
from nim_build.errors import AccuracyGateError, UserError
from nim_build.options import DEFAULT_GATE, DEFAULT_MAX_SEQ_LEN, FP8_QUANTS, BuildOptions, resolve_max_seq_len
from nim_build.outputs import check_free_space, check_output, output_dir


@dataclass
class _Build:
    """What the stages hand down: decided once, read by every later stage."""

    opts: BuildOptions
    resolved: object  # resolve.ResolvedModel
    source: object  # source.SourceModel
    plan: object  # plan.ParallelPlan
    backend: str
    max_seq_len: int
    t0: float
    timings: dict = field(default_factory=dict)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_out(model: str) -> Path:
    from nim_build.builder.default_model import DEFAULT_MODEL, is_default_model

    return Path("engines") / (DEFAULT_MODEL if is_default_model(model) else Path(model.split("@")[0]).name)


def build(opts: BuildOptions, progress: bool = True, argv: Sequence[str] | None = None) -> dict:
    """Build opts.out (default engines/<model name>); returns the summary `nim_build engine` prints.
    argv: the user's command line after `nim_build`, reproduced in messages that suggest another command."""
    from nim_build.builder.backends import choose_backend
    from nim_build.builder.convert import planned_bytes
    from nim_build.builder.plan import make_plan
    from nim_build.builder.resolve import resolve_model
    from nim_build.builder.source import open_source

    t0 = time.monotonic()
    limits.configure_torch_threads()  # calibration and the gate compute on the container's CPUs
    out = Path(opts.out) if opts.out else default_out(opts.model)
    check_output(out, opts.force)

    # Cheap checks first: a bad --tp or an unavailable backend fails before any download or conversion.
    resolved = resolve_model(opts.model, allow_pickle=opts.allow_pickle)
    check_output(out, opts.force, protect=(resolved.local_dir,))
    resolve_s = time.monotonic() - t0
    source = open_source(resolved.local_dir)
    try:
        spec = source.spec
        plan = make_plan(spec, opts.tp)
        max_seq_len = resolve_max_seq_len(opts.max_seq_len, spec.max_position_embeddings)
        if max_seq_len > spec.max_position_embeddings:
            raise UserError(
                f"--max-seq-len {max_seq_len} is outside 2..{spec.max_position_embeddings} "
                "(max_position_embeddings of the model)"
            )
        if opts.max_seq_len is None and spec.max_position_embeddings > DEFAULT_MAX_SEQ_LEN:
            _log(
                f"note: max_seq_len defaults to {max_seq_len}; the model supports {spec.max_position_embeddings}: "
                "pass --max-seq-len to build for longer contexts"
            )
        backend, reason = choose_backend(opts.backend, opts.quant, argv=argv)
        if backend == "onnx":
            from nim_build.builder import onnx_export, tensorrt_adapter

            onnx_export.check_supported(quant=opts.quant, kv_cache=opts.kv_cache, tp=opts.tp)
            if opts.tensorrt:
                tensorrt_adapter.require(out)
            if source.tokenizer is None:
                raise UserError(
                    f"{resolved.local_dir} has neither tokenizer.json nor tekken.json; --backend onnx writes "
                    "onnxruntime-genai's model directory, which needs the model's tokenizer: add it"
                )
        elif opts.tensorrt:
            raise UserError("--tensorrt builds a TensorRT engine from the ONNX graph: pass --backend onnx with it")
        if source.tokenizer is None and opts.quant == "fp8":
            raise UserError(
                f"{resolved.local_dir} has neither tokenizer.json nor tekken.json, which FP8 calibration "
                "needs; add the model's tokenizer or build with --quant fp8-pc-pt (no calibration)"
            )
        if source.tokenizer is None and opts.quant in FP8_QUANTS and opts.accuracy_gate:
            raise UserError(
                f"{resolved.local_dir} has neither tokenizer.json nor tekken.json, which the accuracy "
                "gate needs for its evaluation text; add the model's tokenizer or pass --no-accuracy-gate"
            )
        run = _Build(opts, resolved, source, plan, backend, max_seq_len, t0, {"resolve": resolve_s})
        need = planned_bytes(source, plan, quant=opts.quant, kv_cache=opts.kv_cache, dtype=checkpoint_dtype(run))
        check_free_space(out, need * (1 if backend == "reference" else 2))  # an engine is about its checkpoint again
        _log(f"backend: {backend} ({reason})")
        with output_dir(out, opts.force, protect=(source.dir,)) as tmp:
            summary = _build_into(tmp, run, name=opts.name or out.name, progress=progress)
    finally:
        source.close()
    summary["out"] = str(out)
    return summary


def _build_into(tmp: Path, run: _Build, *, name: str, progress: bool) -> dict:
    import torch
    import transformers

    from nim_build.builder.calib_data import token_batch
    from nim_build.builder.convert import CONVERTER_VERSION, convert_checkpoint
    from nim_build.builder.resolve import input_files
    from nim_build.serving.tokenizer import TOKENIZER_FILES

    opts, source, spec, timings = run.opts, run.source, run.source.spec, run.timings
    ckpt = tmp / CHECKPOINT_DIR
    ckpt.mkdir()
    tok_dir = tmp / TOKENIZER_DIR
    tok_dir.mkdir()
    for f in TOKENIZER_FILES:
        if (source.dir / f).is_file():
            shutil.copy2(source.dir / f, tok_dir / f)

    t = time.monotonic()
    calib_ids = None
    if opts.quant == "fp8":
        calib_ids = token_batch(
            source.tokenizer,
            opts.calib_samples,
            opts.calib_seq_len,
            opts.calib_data,
            separator_id=source.tokenizer_meta["end_id"],
        )
        if int(calib_ids.max()) >= spec.vocab_size:
            raise UserError(
                f"the tokenizer in {source.dir} produces token id {int(calib_ids.max())}, beyond "
                f"the model's vocab_size {spec.vocab_size}: the tokenizer does not belong to this model"
            )
    report = convert_checkpoint(
        source,
        ckpt,
        run.plan,
        quant=opts.quant,
        kv_cache=opts.kv_cache,
        calib_ids=calib_ids,
        dtype=checkpoint_dtype(run),
        progress=progress,
        hashed=run.backend == "onnx",  # the ONNX export's data file is checked against it
    )
    timings["calibrate"] = report["calibrate_s"]  # interleaved with conversion: one pass over the weights
    timings["convert"] = time.monotonic() - t - report["calibrate_s"]
    quantization = report["config"]["quantization"]

    onnx_info = forward = verified = None
    if run.backend == "onnx":
        t = time.monotonic()
        onnx_info = _export_onnx(run, tmp, report["sha256"])
        hidden, verified = onnx_info.pop("hidden_states"), onnx_info.pop("verified")
        timings["onnx"] = time.monotonic() - t

    accuracy = None
    if opts.quant in FP8_QUANTS and opts.accuracy_gate:
        t = time.monotonic()
        if onnx_info is not None:
            from nim_build.builder.onnx_verify import OrtDecoder

            forward = OrtDecoder(tmp / ONNX_DIR, hidden).forward
        accuracy = _accuracy_gate(opts, source, tmp, forward)
        timings["accuracy"] = time.monotonic() - t
        forward = None  # the session's memory goes before the engine build

    build_config = None
    engine_version = None
    if run.backend == "trtllm":
        from nim_build.builder import trtllm_adapter

        t = time.monotonic()
        build_config = trtllm_adapter.build_engine(
            ckpt,
            tmp / ENGINE_DIR,
            max_batch_size=opts.max_batch_size,
            max_seq_len=run.max_seq_len,
            max_input_len=run.max_seq_len,
            max_num_tokens=opts.max_num_tokens,
            quant_algo=quantization["quant_algo"],
            workers=opts.workers,
        )
        engine_version = trtllm_adapter.probe().version
        timings["engine"] = time.monotonic() - t
    if onnx_info is not None and opts.tensorrt:
        from nim_build.builder import tensorrt_adapter

        t = time.monotonic()
        onnx_info["tensorrt"] = tensorrt_adapter.build_engine(
            tmp / ONNX_DIR, max_batch_size=opts.max_batch_size, max_seq_len=run.max_seq_len
        )
        timings["engine"] = time.monotonic() - t

    gpu = None
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        gpu = {
            "name": torch.cuda.get_device_name(),
            "compute_capability": f"{cc[0]}.{cc[1]}",
            "arch": f"sm{cc[0]}{cc[1]}",
        }
    timings["total"] = time.monotonic() - run.t0
    calibrated = calib_ids is not None
    manifest = {
        "name": name,
        "backend": run.backend,
        "model": {
            "source": run.resolved.source,
            "revision": run.resolved.revision,
            "local_dir": str(source.dir),
            "architecture": spec.architecture,
            "input_files": hash_files(source.dir, input_files(source.dir)),
        },
        "spec": spec.to_dict(),
        "build": {
            "options": opts.portable(),
            "converter_version": CONVERTER_VERSION,
            "quant": opts.quant,
            "quant_algo": quantization["quant_algo"],
            "kv_cache": opts.kv_cache,
            "kv_cache_quant_algo": quantization["kv_cache_quant_algo"],
            "tp": opts.tp,
            "pp": 1,
            "world_size": opts.tp,
            "max_batch_size": opts.max_batch_size,
            "max_seq_len": run.max_seq_len,
            "max_input_len": run.max_seq_len,
            "max_num_tokens": opts.max_num_tokens,
            "calib_samples": opts.calib_samples if calibrated else None,
            "calib_seq_len": opts.calib_seq_len if calibrated else None,
            "calib_data": opts.calib_data or ("built-in" if calibrated else None),
            "parallel_plan": run.plan.to_dict(),
            "trtllm_build_config": build_config,
        },
        "onnx": onnx_info,
        "tokenizer": {"dir": TOKENIZER_DIR, **(source.tokenizer_meta or {"kind": None})},
        "versions": {
            "nim_build": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tensorrt_llm_target": TRTLLM_VERSION,
            "tensorrt_llm": engine_version,
            **(_onnx_versions() if onnx_info is not None else {}),
        },
        "gpu": gpu,
        "outputs": hash_tree(tmp, known=verified),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_bytes": _peak_rss(),
        "accuracy": accuracy,
    }
    write_manifest(tmp, manifest)
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return {
        "name": name,
        "backend": run.backend,
        "quant": opts.quant,
        "tp": opts.tp,
        "size_bytes": size,
        "checkpoint_bytes": report["bytes_written"],
        "time_s": round(timings["total"], 2),
        "peak_rss_bytes": manifest["peak_rss_bytes"],
        "accuracy": accuracy,
        "max_seq_len": run.max_seq_len,
    }


def checkpoint_dtype(run: _Build) -> str | None:
    """The checkpoint's dtype when the backend decides it (onnx: onnx_export.ONNX_DTYPES), else None: the
    converter's rule (the quant's, or the model's own)."""
    from nim_build.builder.onnx_export import ONNX_DTYPES

    return ONNX_DTYPES[run.opts.quant] if run.backend == "onnx" else None


def _export_onnx(run: _Build, tmp: Path, written: dict[str, str]) -> dict:
    """OUT/onnx: the graph from the checkpoint just written, the tokenizer (onnxruntime-genai reads it from the
    model directory), checked before anything else reads it: the data file against the checkpoint's sha256 as the
    converter wrote it (`written`, by file name)."""
    from nim_build.builder.onnx_export import CHECKPOINT_FILE, DATA_FILE, export_onnx
    from nim_build.builder.onnx_verify import check_export
    from nim_build.builder.tensorrt_adapter import profile_shapes, trtexec_command
    from nim_build.serving.tokenizer import other_end_ids

    meta, onnx_dir = run.source.tokenizer_meta, tmp / ONNX_DIR
    shutil.copytree(tmp / TOKENIZER_DIR, onnx_dir)
    info = export_onnx(
        tmp / CHECKPOINT_DIR,
        onnx_dir,
        max_seq_len=run.max_seq_len,
        bos_id=meta["bos_id"],
        end_ids=[meta["end_id"], *other_end_ids(onnx_dir, meta["end_id"])],
        pad_id=meta["pad_id"],
    )
    sha = written[CHECKPOINT_FILE]
    check_export(onnx_dir, sha)
    info["verified"] = {f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}": sha, f"{ONNX_DIR}/{DATA_FILE}": sha}
    shapes = profile_shapes(onnx_dir, max_batch_size=run.opts.max_batch_size, max_seq_len=run.max_seq_len)
    info["trtexec"] = trtexec_command(shapes, Path(ONNX_DIR))  # run from the engine directory
    _log(f"onnx: {info['nodes']} nodes; the data file is {info['data']}; onnx.checker passed")
    return info


def _onnx_versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _accuracy_gate(opts: BuildOptions, source, engine_dir: Path, forward=None) -> dict:
    from nim_build.builder.accuracy import check_gate, evaluate
    from nim_build.builder.calib_data import token_batch

    eval_ids = token_batch(source.tokenizer, 8, 128, opts.eval_data, separator_id=source.tokenizer_meta["end_id"])
    report = evaluate(source, engine_dir, eval_ids, forward=forward)
    min_top1, max_ppl_increase = gate_thresholds(opts, source.dir)
    failures = check_gate(report, min_top1=min_top1, max_ppl_increase=max_ppl_increase)
    report["gate"] = {
        "min_top1": min_top1,
        "max_ppl_increase": max_ppl_increase,
        "passed": not failures,
        "failures": failures,
    }
    if failures:
        raise AccuracyGateError(
            "accuracy gate failed: "
            + "; ".join(failures)
            + " (tune with --min-top1 and --max-ppl-increase, or skip with --no-accuracy-gate)"
        )
    return report


def gate_thresholds(opts: BuildOptions, model_dir: Path) -> tuple[float, float]:
    """The user's thresholds, else the embedded default model's own (see default_model.FP8_GATE), else
    options.DEFAULT_GATE."""
    from nim_build.builder.default_model import FP8_GATE, is_default_model, is_default_model_dir

    own = FP8_GATE if is_default_model(opts.model) or is_default_model_dir(model_dir) else DEFAULT_GATE
    return (
        own[0] if opts.min_top1 is None else opts.min_top1,
        own[1] if opts.max_ppl_increase is None else opts.max_ppl_increase,
    )
