"""The model cache of a serving node: build an engine once per GPU architecture and TensorRT-LLM version, reuse it after.

TensorRT engines only run on the GPU compute capability and the TensorRT-LLM version that built them, so the
Helm chart's init container calls ``nim_build cache-engine`` on a shared cache volume. Layout of CACHE_DIR::

    hf/                         huggingface_hub cache (HF_HUB_CACHE of the build: safetensors, config, tokenizer)
    engines/<slug>--<key>/      complete engine directories (``nim_build engine`` output, with manifest.json)
    engines/.tmp-<key>-*/       builds in progress, private to one builder
    locks/<key>.lock            flock held while a key is being built

The key is content-addressed: sha256 over the model (id + resolved commit, or a local directory's fingerprint),
the build settings, the GPU compute capability and the TensorRT-LLM version. Replicas starting together take the
lock one after the other; the first builds into a private temporary directory and renames it into place when
complete, the others find the finished directory. Even where the filesystem ignores locks, the rename is atomic
and the first complete directory wins, so no reader ever sees a partial engine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Callable

from nim_build import __version__
from nim_build.errors import UserError
from nim_build.builder.manifest import MANIFEST
from nim_build.builder.resolve import DEFAULT_ALIASES

KEY_FORMAT = 1
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class EngineRequest:
    """What to build: the arguments of ``nim_build engine`` that change the engine."""

    model: str
    revision: str = "main"
    quant: str = "fp8"
    tp: int = 1
    backend: str = "auto"
    max_batch_size: int = 64
    max_seq_len: int = 8192


def detect_gpu_arch() -> str:
    """Compute capability of the visible GPUs as "sm90", or "cpu" when nvidia-smi finds none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    caps = sorted({line.strip() for line in out.splitlines() if line.strip()})
    if not caps:
        return "cpu"
    if len(caps) > 1:
        raise UserError(f"the visible GPUs differ in compute capability ({', '.join(caps)}); "
                        "schedule the pod on identical GPUs (Helm value gpu.products)")
    return "sm" + caps[0].replace(".", "")


def tensorrt_llm_version() -> str | None:
    """Installed TensorRT-LLM version, read from package metadata (no import: importing it takes seconds)."""
    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return None


def local_fingerprint(model_dir: Path) -> str:
    """Identity of a local checkpoint directory: its config.json content plus every file's name and size."""
    h = hashlib.sha256()
    config = model_dir / "config.json"
    if not config.is_file():
        raise UserError(f"{model_dir} has no config.json: give a Hugging Face checkpoint directory or a hub id")
    h.update(config.read_bytes())
    for p in sorted(model_dir.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(model_dir).as_posix()}\0{p.stat().st_size}\n".encode())
    return "local-" + h.hexdigest()[:40]


def resolve_revision(model: str, revision: str, hf_cache: Path) -> str:
    """The commit a hub revision points to: from the Hub, or from the cache's refs when offline."""
    if _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    ref = hf_cache / ("models--" + model.replace("/", "--")) / "refs" / revision
    if constants.HF_HUB_OFFLINE:
        if ref.is_file():
            return ref.read_text().strip()
        raise UserError(f"offline mode and the cache has no {model}@{revision} (no {ref}); "
                        "pre-populate the cache or pin model.revision to a commit")
    try:
        return HfApi().model_info(model, revision=revision).sha
    except OfflineModeIsEnabled as e:
        raise UserError(f"cannot resolve {model}@{revision} offline: {e}") from None
    except HfHubHTTPError as e:
        raise UserError(f"cannot resolve {model}@{revision} on the Hugging Face Hub ({e}); "
                        "check the model id, and the token Secret for gated models") from None
    except OSError as e:  # connection errors (requests/httpx)
        raise UserError(f"cannot reach the Hugging Face Hub to resolve {model}@{revision} ({type(e).__name__}); "
                        "pin model.revision to a commit and pre-populate the cache for air-gapped use") from None


def engine_key(req: EngineRequest, gpu_arch: str, trtllm: str | None) -> str:
    """Content address of an engine: sha256 (first 20 hex digits) over everything the engine depends on.

    req must be resolved: req.revision a hub commit or a local directory's fingerprint.
    """
    fields = {**asdict(req), "gpu_arch": gpu_arch, "tensorrt_llm": trtllm, "key_format": KEY_FORMAT}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def _slug(req: EngineRequest, gpu_arch: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(req.model.rstrip("/")).name) or "model"
    return f"{name}-{req.quant}-tp{req.tp}-{gpu_arch}"


def run_engine_build(model: str, out: Path, req: EngineRequest, hf_cache: Path) -> None:
    """Build with ``nim_build engine`` in a child process that downloads into hf_cache (its output goes to stderr)."""
    cmd = [sys.executable, "-m", "nim_build", "engine", model, "--out", str(out),
           "--quant", req.quant, "--tp", str(req.tp), "--backend", req.backend,
           "--max-batch-size", str(req.max_batch_size), "--max-seq-len", str(req.max_seq_len)]
    _log(f"running: nim_build {' '.join(cmd[3:])}")
    rc = subprocess.run(cmd, stdout=sys.stderr, env={**os.environ, "HF_HUB_CACHE": str(hf_cache)}).returncode
    if rc != 0:
        raise UserError(f"`nim_build engine` failed with exit code {rc} (its log is above); "
                        "the cache was left unchanged")


def ensure_engine(
    cache_dir: str | os.PathLike,
    req: EngineRequest,
    *,
    gpu_arch: str | None = None,
    trtllm: str | None = None,
    build: Callable[[str, Path, EngineRequest, Path], None] = run_engine_build,
) -> Path:
    """Return the cache's engine directory for req on this node, building it first when the cache lacks it.

    gpu_arch and trtllm default to what this machine has. build(model, out_dir, req, hf_cache) must create
    out_dir as a complete engine directory (with manifest.json); model is what ``nim_build engine`` takes: a
    local directory, ``default``, or ``org/name@commit``.
    """
    cache = Path(cache_dir)
    gpu_arch = gpu_arch or detect_gpu_arch()
    trtllm = trtllm if trtllm is not None else tensorrt_llm_version()
    hf_cache = cache / "hf"
    repo_id, _, at_revision = req.model.partition("@")
    local = Path(req.model).expanduser()
    if req.model in DEFAULT_ALIASES:  # the bundled default model: fixed by the nim_build version
        identity, model = f"default-{__version__}", req.model
    elif local.is_dir():
        identity, model = local_fingerprint(local.resolve()), str(local.resolve())
    else:
        identity = resolve_revision(repo_id, at_revision or req.revision, hf_cache)
        model = f"{repo_id}@{identity}"
    req = replace(req, model=repo_id, revision=identity)
    key = engine_key(req, gpu_arch, trtllm)
    engines = cache / "engines"
    target = engines / f"{_slug(req, gpu_arch)}--{key}"
    if (target / MANIFEST).is_file():
        _log(f"engine found in the cache: {target}")
        return target

    for d in (engines, cache / "locks"):
        d.mkdir(parents=True, exist_ok=True)
    with open(cache / "locks" / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another pod is building {target.name}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MANIFEST).is_file():
            _log(f"engine built by another pod: {target}")
            return target
        if target.exists():
            # A directory without a manifest is never complete; only a non-atomic copy can leave one.
            _log(f"removing incomplete {target}")
            shutil.rmtree(target)
        for stale in engines.glob(f".tmp-{key}-*"):  # left by a builder that died (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=engines))
        try:
            out = tmp / target.name
            _log(f"no engine for this GPU ({gpu_arch}) and TensorRT-LLM ({trtllm or 'not installed'}); "
                 f"building {target.name}")
            build(model, out, req, hf_cache)
            if not (out / MANIFEST).is_file():
                raise UserError(f"the engine build left no {MANIFEST} in {out}; the cache was left unchanged")
            try:
                os.rename(out, target)
            except OSError:
                if not (target / MANIFEST).is_file():  # not a finished copy from a pod that ignored the lock
                    raise
                _log(f"another pod finished {target.name} first; using it")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"engine ready: {target}")
    return target


def _log(msg: str) -> None:
    print(f"[nim_build cache] {msg}", file=sys.stderr, flush=True)
