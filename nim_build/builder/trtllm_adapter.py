"""TensorRT-LLM 1.2 engine builds: the only module that imports `tensorrt_llm`, always inside a function.

`probe()` says whether this machine can build engines (TensorRT-LLM 1.2.x importable, a CUDA GPU visible) and
`build_engine()` builds `rank{r}.engine` + `config.json` from a TensorRT-LLM checkpoint with the Python API that
`trtllm-build` uses, passing every in-flight-batching setting explicitly (defaults moved between releases):

    model  = tensorrt_llm.models.LLaMAForCausalLM.from_checkpoint(checkpoint_dir, rank=r)
    engine = tensorrt_llm.builder.build(model, BuildConfig(..., kv_cache_type=KVCacheType.PAGED,
                                                           plugin_config=PluginConfig(...)))
    engine.save(engine_dir)          # rank 0 also writes config.json {version, pretrained_config, build_config}

Facts from the TensorRT-LLM sources this relies on (1.1/1.2 line):
- `tensorrt_llm/builder.py` defines `BuildConfig` (dataclass: max_input_len, max_seq_len, max_batch_size,
  max_beam_width, max_num_tokens, opt_num_tokens, kv_cache_type, strongly_typed, plugin_config, ...), `build()`,
  `Engine.save()`, and imports the `KVCacheType` its `BuildConfig` compares against: we take it from there.
- `build()` derives `plugin_config.paged_kv_cache` from `kv_cache_type` (`BuildConfig.update_kv_cache_type`),
  sets `plugin_config.dtype` from the checkpoint, forces `strongly_typed` for FP8, and turns
  `use_fp8_context_fmha` off itself when the GPU is below SM 89 or (with paged context FMHA) the KV cache is not
  FP8: we pass the value it would end with, so the manifest records what the engine really uses.
- `PluginConfig` (pydantic, `tensorrt_llm/plugin/plugin.py`): context_fmha, remove_input_padding,
  tokens_per_block, use_paged_context_fmha, use_fp8_context_fmha, multiple_profiles, gemm_plugin,
  gpt_attention_plugin ("auto" = the model dtype).
- `trtllm-build` refuses `multiple_profiles` together with `opt_num_tokens`, so opt_num_tokens stays unset;
  with `--workers N` it builds ranks in a spawn-context process pool, rank r on GPU r % N.
"""

from __future__ import annotations

import importlib.util
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from nim_build import TOKENS_PER_BLOCK, TRTLLM_VERSION
from nim_build.errors import ConfigError, NimBuildError
from nim_build.options import FP8_QUANT_ALGOS

SUPPORTED_LINE = TRTLLM_VERSION.rsplit(".", 1)[0] + "."  # "1.2.": the last release line that builds engines
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell


@dataclass(frozen=True)
class BackendProbe:
    available: bool  # TensorRT-LLM 1.2.x importable and a CUDA GPU visible
    version: str | None  # tensorrt_llm.__version__ when importable
    gpu_name: str | None
    compute_capability: tuple[int, int] | None
    reason: str  # why not available ("" when available)

    @property
    def fp8_capable(self) -> bool:
        return self.compute_capability is not None and self.compute_capability >= FP8_MIN_COMPUTE_CAPABILITY


def _cuda_device() -> tuple[str, tuple[int, int]] | None:
    """Name and compute capability of GPU 0 as torch sees it, or None without a usable CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), (int(major), int(minor))


def probe() -> BackendProbe:
    device = _cuda_device()
    gpu_name, cc = device if device else (None, None)
    version = None
    if importlib.util.find_spec("tensorrt_llm") is None:
        reason = "TensorRT-LLM is not installed"
    else:
        try:
            import tensorrt_llm

            version = str(tensorrt_llm.__version__)
            reason = ""
        except Exception as e:  # ImportError, or OSError/RuntimeError from its CUDA/TensorRT libraries
            reason = f"tensorrt_llm cannot be imported ({type(e).__name__}: {e})"
        if version and not version.startswith(SUPPORTED_LINE):
            reason = f"TensorRT-LLM {version} is installed, but nim_build builds engines with {SUPPORTED_LINE}x"
    if not reason and device is None:
        reason = "no CUDA GPU is visible"
    return BackendProbe(not reason, version, gpu_name, cc, reason)


def build_settings(
    *,
    max_batch_size: int,
    max_seq_len: int,
    max_input_len: int,
    max_num_tokens: int,
    quant_algo: str | None,
    kv_cache_quant_algo: str | None = None,
    tokens_per_block: int = TOKENS_PER_BLOCK,
) -> dict:
    """The BuildConfig / PluginConfig values, as JSON: what every rank is built with and what the manifest records."""
    if not 1 <= max_input_len <= max_seq_len:
        raise ConfigError(f"max_input_len {max_input_len} must be in 1..max_seq_len ({max_seq_len})")
    if max_batch_size < 1 or max_num_tokens < 1 or tokens_per_block < 1:
        raise ConfigError("max_batch_size, max_num_tokens and tokens_per_block must be >= 1")
    fp8 = quant_algo in FP8_QUANT_ALGOS
    return {
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "max_input_len": max_input_len,
        "max_num_tokens": max_num_tokens,
        "max_beam_width": 1,
        "kv_cache_type": "PAGED",
        "strongly_typed": True,
        "plugin_config": {
            "gpt_attention_plugin": "auto",
            "gemm_plugin": None if fp8 else "auto",  # FP8 GEMMs run without the cuBLASLt plugin
            "context_fmha": True,
            "remove_input_padding": True,
            "use_paged_context_fmha": True,  # KV-cache reuse and chunked context
            "use_fp8_context_fmha": quant_algo == "FP8" and kv_cache_quant_algo == "FP8",
            "multiple_profiles": True,
            "tokens_per_block": tokens_per_block,
        },
    }


def build_engine(
    checkpoint_dir,
    engine_dir,
    *,
    max_batch_size: int,
    max_seq_len: int,
    max_input_len: int,
    max_num_tokens: int,
    quant_algo: str | None,
    tokens_per_block: int = TOKENS_PER_BLOCK,
    workers: int = 1,
) -> dict:
    """Build one engine per rank of the checkpoint into engine_dir (the caller handles temp dir + rename).

    Returns {tensorrt_llm_version, world_size, workers, ranks, build_config} for the manifest."""
    checkpoint_dir, engine_dir = Path(checkpoint_dir), Path(engine_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    quantization = config.get("quantization") or {}
    ckpt_algo = quantization.get("quant_algo")
    if ckpt_algo != quant_algo:
        raise ConfigError(f"{checkpoint_dir} is quantized as {ckpt_algo}, but the engine was asked for {quant_algo}")
    world_size = int(config["mapping"]["world_size"])
    settings = build_settings(
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_input_len=max_input_len,
        max_num_tokens=max_num_tokens,
        quant_algo=quant_algo,
        kv_cache_quant_algo=quantization.get("kv_cache_quant_algo"),
        tokens_per_block=tokens_per_block,
    )

    import tensorrt_llm
    import torch

    workers = max(1, min(workers, world_size))
    if torch.cuda.is_available():
        workers = min(workers, torch.cuda.device_count())
    engine_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(rank, rank % workers, str(checkpoint_dir), str(engine_dir), settings) for rank in range(world_size)]
    if workers == 1:
        ranks = [_build_rank(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_build_rank, *job) for job in jobs]
            ranks = sorted((f.result() for f in as_completed(futures)), key=lambda r: r["rank"])

    missing = [
        name
        for name in ["config.json"] + [f"rank{r}.engine" for r in range(world_size)]
        if not (engine_dir / name).is_file()
    ]
    if missing:
        raise NimBuildError(f"TensorRT-LLM finished without writing {', '.join(missing)} into {engine_dir}")
    return {
        "tensorrt_llm_version": str(tensorrt_llm.__version__),
        "world_size": world_size,
        "workers": workers,
        "ranks": ranks,
        "build_config": settings,
    }


def _build_rank(rank: int, gpu: int, checkpoint_dir: str, engine_dir: str, settings: dict) -> dict:
    """One rank, in this process or a spawned worker: load its weights, build, save rank{rank}.engine."""
    import torch
    from tensorrt_llm.builder import BuildConfig, KVCacheType, build
    from tensorrt_llm.models import LLaMAForCausalLM
    from tensorrt_llm.plugin import PluginConfig

    t0 = time.monotonic()
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu)
    plugin_config = PluginConfig()
    for name, value in settings["plugin_config"].items():
        setattr(plugin_config, name, value)
    fields = {k: v for k, v in settings.items() if k != "plugin_config"}
    fields["kv_cache_type"] = getattr(KVCacheType, settings["kv_cache_type"])
    build_config = BuildConfig(**fields, plugin_config=plugin_config)
    model = LLaMAForCausalLM.from_checkpoint(checkpoint_dir, rank=rank)
    engine = build(model, build_config)
    engine.save(engine_dir)
    return {"rank": rank, "gpu": gpu, "seconds": round(time.monotonic() - t0, 3)}
