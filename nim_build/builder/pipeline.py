"""`nim_build engine`: resolve -> plan -> calibrate + convert (streamed) -> accuracy gate -> engine -> manifest.

Everything is written into a temporary sibling of the output directory, which is renamed into place when
complete; manifest.json is its last file. A build killed at any point (SIGKILL included) leaves at most a
`.<name>.partial-<pid>` directory, which the next build removes.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nim_build import TOKENS_PER_BLOCK, TRTLLM_VERSION, __version__
from nim_build.errors import AccuracyGateError, OutputExistsError, UserError
from nim_build.builder.manifest import CHECKPOINT_DIR, ENGINE_DIR, TOKENIZER_DIR, hash_files, hash_tree, write_manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tekken.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja", "chat_template.json")
DEFAULT_MAX_SEQ_LEN = 8192


@dataclass
class BuildOptions:
    """Every knob of `nim_build engine`; the YAML config takes the same keys (dashes or underscores)."""

    model: str
    out: str | None = None
    quant: str = "fp8"
    kv_cache: str = "auto"
    tp: int = 1
    backend: str = "auto"
    max_batch_size: int = 64
    max_seq_len: int | None = None      # default: min(max_position_embeddings, 8192)
    max_num_tokens: int = 8192
    calib_data: str | None = None
    calib_samples: int = 32
    calib_seq_len: int = 256
    eval_data: str | None = None
    accuracy_gate: bool = True
    min_top1: float | None = None          # gate thresholds; default: gate_thresholds()
    max_ppl_increase: float | None = None
    force: bool = False
    allow_pickle: bool = False
    workers: int = 1
    name: str | None = None
    argv: list[str] = field(default_factory=list)   # the user's command line, for messages


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_out(model: str) -> Path:
    name = Path(model.split("@")[0]).name if model != "default" else "SmolLM2-135M-Instruct"
    return Path("engines") / name


def build(opts: BuildOptions, progress: bool = True) -> dict:
    from nim_build.builder.backends import choose_backend
    from nim_build.builder.convert import check_checkpoint
    from nim_build.builder.plan import make_plan
    from nim_build.builder.resolve import resolve_model
    from nim_build.builder.spec import load_spec

    t0 = time.monotonic()
    timings = {}
    out = Path(opts.out) if opts.out else default_out(opts.model)
    if out.exists() and not opts.force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it or choose another --out")
    if opts.max_batch_size < 1:
        raise UserError("--max-batch-size must be >= 1")
    if opts.max_num_tokens < TOKENS_PER_BLOCK:
        raise UserError(f"--max-num-tokens {opts.max_num_tokens} is less than one KV-cache block "
                        f"({TOKENS_PER_BLOCK} tokens): no prompt could be scheduled")

    # Cheap checks first: a bad --tp or an unavailable backend fails before any download or conversion.
    resolved = resolve_model(opts.model, allow_pickle=opts.allow_pickle)
    timings["resolve"] = time.monotonic() - t0
    spec = load_spec(resolved.local_dir)
    plan = make_plan(spec, opts.tp, opts.quant, opts.kv_cache)
    max_seq_len = opts.max_seq_len or min(spec.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if max_seq_len > spec.max_position_embeddings or max_seq_len < 2:
        raise UserError(f"--max-seq-len {max_seq_len} is outside 2..{spec.max_position_embeddings} "
                        "(max_position_embeddings of the model)")
    if opts.max_seq_len is None and spec.max_position_embeddings > DEFAULT_MAX_SEQ_LEN:
        _log(f"note: max_seq_len defaults to {max_seq_len}; the model supports {spec.max_position_embeddings}: "
             "pass --max-seq-len to build for longer contexts")
    backend, reason = choose_backend(opts.backend, opts.quant, argv=opts.argv)
    check_checkpoint(resolved.local_dir, spec)
    if opts.quant == "fp8" and not any((resolved.local_dir / f).is_file() for f in ("tokenizer.json", "tekken.json")):
        raise UserError(f"{resolved.local_dir} has neither tokenizer.json nor tekken.json, which FP8 calibration "
                        "needs; add the model's tokenizer or build with --quant fp8-pc-pt (no calibration)")
    _log(f"backend: {backend} ({reason})")

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove_stale_partials(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        summary = _build_into(tmp, opts, resolved, spec, plan, backend, max_seq_len, timings, t0, progress)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = str(out)
    return summary


def _build_into(tmp, opts, resolved, spec, plan, backend, max_seq_len, timings, t0, progress) -> dict:
    import torch

    from nim_build.builder.calib_data import token_batch
    from nim_build.builder.convert import convert_checkpoint

    ckpt = tmp / CHECKPOINT_DIR
    ckpt.mkdir()
    tok_dir = tmp / TOKENIZER_DIR
    tok_dir.mkdir()
    for f in TOKENIZER_FILES:
        if (resolved.local_dir / f).is_file():
            shutil.copy2(resolved.local_dir / f, tok_dir / f)

    t = time.monotonic()
    calib_ids = None
    if opts.quant == "fp8":
        calib_ids = token_batch(tok_dir, opts.calib_samples, opts.calib_seq_len, opts.calib_data,
                                separator_id=_first_id(spec.eos_token_id))
        if int(calib_ids.max()) >= spec.vocab_size:
            raise UserError(f"the tokenizer in {resolved.local_dir} produces token id {int(calib_ids.max())}, beyond "
                            f"the model's vocab_size {spec.vocab_size}: the tokenizer does not belong to this model")
    report = convert_checkpoint(resolved.local_dir, ckpt, quant=opts.quant, kv_cache=opts.kv_cache, tp=opts.tp,
                                calib_ids=calib_ids, progress=progress)
    timings["calibrate"] = report["calibrate_s"]  # interleaved with conversion: one pass over the weights
    timings["convert"] = time.monotonic() - t - report["calibrate_s"]

    accuracy = None
    if opts.quant in ("fp8", "fp8-pc-pt") and opts.accuracy_gate:
        t = time.monotonic()
        accuracy = _accuracy_gate(opts, resolved.local_dir, tmp, tok_dir, spec)
        timings["accuracy"] = time.monotonic() - t

    build_config = None
    engine_version = None
    if backend == "trtllm":
        from nim_build.builder import trtllm_adapter

        t = time.monotonic()
        build_config = trtllm_adapter.build_engine(
            ckpt, tmp / ENGINE_DIR, max_batch_size=opts.max_batch_size, max_seq_len=max_seq_len,
            max_input_len=max_seq_len, max_num_tokens=opts.max_num_tokens,
            quant_algo=report["config"]["quantization"]["quant_algo"], workers=opts.workers)
        engine_version = trtllm_adapter.probe().version
        timings["engine"] = time.monotonic() - t

    gpu = None
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        gpu = {"name": torch.cuda.get_device_name(), "compute_capability": f"{cc[0]}.{cc[1]}",
               "arch": f"sm{cc[0]}{cc[1]}"}
    timings["total"] = time.monotonic() - t0
    import transformers

    manifest = {
        "name": opts.name or (Path(opts.out).name if opts.out else default_out(opts.model).name),
        "backend": backend,
        "model": {"source": resolved.source, "revision": resolved.revision, "local_dir": str(resolved.local_dir),
                  "architecture": spec.architecture, "input_files": _input_hashes(resolved.local_dir)},
        "spec": spec.to_dict(),
        "build": {
            "quant": opts.quant, "quant_algo": report["config"]["quantization"]["quant_algo"],
            "kv_cache": opts.kv_cache, "kv_cache_quant_algo": report["config"]["quantization"]["kv_cache_quant_algo"],
            "tp": opts.tp, "pp": 1, "world_size": opts.tp, "max_batch_size": opts.max_batch_size,
            "max_seq_len": max_seq_len, "max_input_len": max_seq_len, "max_num_tokens": opts.max_num_tokens,
            "calib_samples": opts.calib_samples if calib_ids is not None else None,
            "calib_seq_len": opts.calib_seq_len if calib_ids is not None else None,
            "calib_data": opts.calib_data or ("built-in" if calib_ids is not None else None),
            "parallel_plan": plan.to_dict(), "trtllm_build_config": build_config,
        },
        "tokenizer": _tokenizer_info(tok_dir, spec),
        "versions": {"nim_build": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "tensorrt_llm_target": TRTLLM_VERSION, "tensorrt_llm": engine_version},
        "gpu": gpu,
        "outputs": hash_tree(tmp),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_bytes": _peak_rss(),
        "accuracy": accuracy,
    }
    write_manifest(tmp, manifest)
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return {"name": manifest["name"], "backend": backend, "quant": opts.quant, "tp": opts.tp,
            "size_bytes": size, "checkpoint_bytes": report["bytes_written"], "time_s": round(timings["total"], 2),
            "peak_rss_bytes": manifest["peak_rss_bytes"], "accuracy": accuracy, "max_seq_len": max_seq_len}


def _accuracy_gate(opts, model_dir, engine_dir, tok_dir, spec) -> dict:
    from nim_build.builder.accuracy import check_gate, evaluate
    from nim_build.builder.calib_data import token_batch

    eval_ids = token_batch(tok_dir, 8, 128, opts.eval_data, separator_id=_first_id(spec.eos_token_id))
    report = evaluate(model_dir, engine_dir, eval_ids)
    min_top1, max_ppl_increase = gate_thresholds(opts, model_dir)
    failures = check_gate(report, min_top1=min_top1, max_ppl_increase=max_ppl_increase)
    report["gate"] = {"min_top1": min_top1, "max_ppl_increase": max_ppl_increase,
                      "passed": not failures, "failures": failures}
    if failures:
        raise AccuracyGateError("accuracy gate failed: " + "; ".join(failures) +
                                " (tune with --accuracy-gate MIN_TOP1,MAX_PPL_INCREASE or skip with --no-accuracy-gate)")
    return report


def gate_thresholds(opts: BuildOptions, model_dir: Path) -> tuple[float, float]:
    """The user's thresholds, else the embedded default model's own (see default_model.FP8_GATE), else
    accuracy.DEFAULT_GATE."""
    from nim_build.builder.accuracy import DEFAULT_GATE
    from nim_build.builder.default_model import FP8_GATE, is_default_model, is_default_model_dir

    own = FP8_GATE if is_default_model(opts.model) or is_default_model_dir(model_dir) else DEFAULT_GATE
    return (own[0] if opts.min_top1 is None else opts.min_top1,
            own[1] if opts.max_ppl_increase is None else opts.max_ppl_increase)


def _input_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every file the build read: config, weights (+ index) and tokenizer files."""
    names = ["config.json", "model.safetensors.index.json", *TOKENIZER_FILES]
    files = [model_dir / n for n in names] + sorted(model_dir.glob("*.safetensors"))
    return hash_files(model_dir, [f for f in files if f.is_file()])


def _first_id(x):
    return x[0] if isinstance(x, list) else x


def _tokenizer_info(tok_dir: Path, spec) -> dict:
    import json

    kind = "hf" if (tok_dir / "tokenizer.json").is_file() else "tekken" if (tok_dir / "tekken.json").is_file() else None
    end_id = _first_id(spec.eos_token_id)
    bos_id, pad_id = spec.bos_token_id, spec.pad_token_id
    gen = tok_dir / "generation_config.json"
    if gen.is_file():
        g = json.loads(gen.read_text())
        end_id = _first_id(g.get("eos_token_id", end_id))
        bos_id = g.get("bos_token_id", bos_id)
        pad_id = g.get("pad_token_id", pad_id)
    chat = False
    cfg = tok_dir / "tokenizer_config.json"
    if cfg.is_file():
        chat = bool(json.loads(cfg.read_text()).get("chat_template"))
    chat = chat or (tok_dir / "chat_template.jinja").is_file() or kind == "tekken"
    return {"dir": TOKENIZER_DIR, "kind": kind, "bos_id": bos_id, "end_id": end_id,
            "pad_id": pad_id if pad_id is not None else end_id, "chat_template": chat}


def _remove_stale_partials(out: Path) -> None:
    """Remove partial outputs of builds that were killed (their pid no longer runs)."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an old output (--force) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
