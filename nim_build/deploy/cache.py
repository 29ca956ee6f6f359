"""The model cache of a serving node: an engine built once per GPU architecture and TensorRT-LLM version, then reused.

TensorRT engines only run on the GPU compute capability and the TensorRT-LLM version that built them, so the
Helm chart's init container calls ``nim_build cache-engine`` on a shared cache volume. Layout of CACHE_DIR::

    hf/                         huggingface_hub cache (HF_HUB_CACHE of the build: safetensors, config, tokenizer)
    hashes.json                 sha256 of local input files, by path + size + mtime + inode
    engines/<slug>--<key>/      complete engine directories (``nim_build engine`` output, with manifest.json)
    engines/.tmp-<key>-*/       builds in progress, private to one builder
    locks/<key>.lock            flock held while a key is being built

The key is content-addressed: sha256 over the model (id + resolved commit, or the sha256 of every input file of a
local directory), the build options that change the engine (nim_build.options.cache_key_fields), the converter's
format version, the GPU compute capability and the TensorRT-LLM version. A local file's hash is remembered in
hashes.json by path, size, mtime and inode, so a warm start does not read a 24 GB checkpoint again. Replicas
starting together take the lock one after the other; the first builds into a private temporary directory and
renames it into place when complete, the others find the finished directory. Even where the filesystem ignores
locks, the rename is atomic and the first complete directory wins, so no reader ever sees a partial engine (a
concurrent builder may then have its temporary directory removed under it and fail: the cache stays consistent).
The build runs in a child process that dies with its parent (PR_SET_PDEATHSIG): a killed cache-engine leaves no
build writing on.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from nim_build import __version__, options
from nim_build.builder.default_model import is_default_model
from nim_build.builder.manifest import MANIFEST, sha256_file
from nim_build.errors import AccuracyGateError, HostError, NimBuildError, UserError
from nim_build.options import BuildOptions

KEY_FORMAT = 2
HASHES_FILE = "hashes.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def detect_gpu_arch() -> str:
    """Compute capability of this node's GPUs as "sm90", or "cpu" when it has none (profiles.detect_node)."""
    from nim_build.deploy.profiles import detect_node

    gpu = detect_node().gpu
    return gpu.arch if gpu else "cpu"


def tensorrt_llm_version() -> str | None:
    """Installed TensorRT-LLM version, read from package metadata (no import: importing it takes seconds)."""
    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return None


def local_fingerprint(model_dir: Path, hashes_file: Path | None = None) -> str:
    """Identity of a local checkpoint directory: the sha256 of every file a build reads (config, weights,
    tokenizer), each hashed once and remembered in hashes_file by path, size, mtime and inode."""
    from nim_build.builder.resolve import input_files

    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json: give a Hugging Face checkpoint directory or a hub id")
    memo = _read_json(hashes_file) if hashes_file else {}
    h = hashlib.sha256()
    changed = False
    for path in input_files(model_dir):
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = memo.get(str(path))
        if not entry or entry["stamp"] != stamp:
            memo[str(path)] = entry = {"stamp": stamp, "sha256": sha256_file(path)}
            changed = True
        h.update(f"{path.relative_to(model_dir).as_posix()}\0{entry['sha256']}\n".encode())
    if hashes_file and changed:
        # a private temporary file (pods in one volume may share pids); a concurrent writer may win the rename:
        # its entries are as valid as ours
        fd, tmp = tempfile.mkstemp(prefix=f".{hashes_file.name}.", dir=hashes_file.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(memo, indent=1) + "\n")
        os.replace(tmp, hashes_file)
    return "local-" + h.hexdigest()[:40]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def resolve_revision(model: str, revision: str, hf_cache: Path) -> str:
    """The commit a hub revision points to: from the Hub, or from the cache's refs when offline."""
    from nim_build.builder.resolve import check_repo_id, check_revision

    check_repo_id(model)
    check_revision(revision)  # before a path in the cache is made from it
    if _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    ref = hf_cache / ("models--" + model.replace("/", "--")) / "refs" / revision
    if constants.HF_HUB_OFFLINE:
        if ref.is_file():
            commit = ref.read_text(errors="replace").strip()
            if not _COMMIT.match(commit):
                raise UserError(f"{ref} does not hold a commit; the cache is damaged: fetch the model again")
            return commit
        raise UserError(
            f"offline mode and the cache has no {model}@{revision} (no {ref}); "
            "pre-populate the cache or pin model.revision to a commit"
        )
    try:
        return HfApi().model_info(model, revision=revision).sha
    except OfflineModeIsEnabled as e:
        raise UserError(f"cannot resolve {model}@{revision} offline: {e}") from None
    except HfHubHTTPError as e:
        raise UserError(
            f"cannot resolve {model}@{revision} on the Hugging Face Hub ({e}); "
            "check the model id, and the token Secret for gated models"
        ) from None
    except OSError as e:  # connection errors (requests/httpx)
        raise UserError(
            f"cannot reach the Hugging Face Hub to resolve {model}@{revision} ({type(e).__name__}); "
            "pin model.revision to a commit and pre-populate the cache for air-gapped use"
        ) from None


def engine_key(model: str, identity: str, opts: BuildOptions, gpu_arch: str, trtllm: str | None) -> str:
    """Content address of an engine: sha256 (first 20 hex digits) over everything the engine depends on.

    identity: a hub commit, a local directory's fingerprint, or the embedded model's version."""
    from nim_build.builder.convert import CONVERTER_VERSION

    fields = {
        "model": model,
        "identity": identity,
        "options": options.cache_key_fields(opts),
        "gpu_arch": gpu_arch,
        "tensorrt_llm": trtllm,
        "converter": CONVERTER_VERSION,
        "key_format": KEY_FORMAT,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def _slug(model: str, opts: BuildOptions, gpu_arch: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name) or "model"
    return f"{name}-{opts.quant}-tp{opts.tp}-{gpu_arch}"


def engine_argv(model: str, out: Path, opts: BuildOptions) -> list[str]:
    """The `nim_build engine` command line (after `nim_build`) that builds opts into out."""
    return ["engine", model, "--out", str(out), *options.to_argv(opts)]


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the parent dies (Linux PR_SET_PDEATHSIG), so that a build whose
    cache-engine was killed stops writing instead of racing the next run, which removes its temporary directory."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def run_engine_build(model: str, out: Path, opts: BuildOptions, hf_cache: Path | None, name: str | None = None) -> None:
    """Build with ``nim_build engine`` in a child process that downloads into hf_cache (None: the environment's
    huggingface_hub cache) and names the engine `name`; its output goes to stderr."""
    argv = engine_argv(model, out, opts) + (["--name", name] if name else [])
    _log(f"running: nim_build {' '.join(argv)}")
    cmd = [sys.executable, "-m", "nim_build", *argv]
    env = {**os.environ, **({"HF_HUB_CACHE": str(hf_cache)} if hf_cache else {})}
    rc = subprocess.run(cmd, stdout=sys.stderr, env=env, preexec_fn=_die_with_parent).returncode
    if rc != 0:  # the build's own exit code carries on (README: exit codes): a gate failure stays a gate failure
        error = {2: UserError, 3: AccuracyGateError, 5: HostError}.get(rc, NimBuildError)
        raise error(f"`nim_build engine` failed with exit code {rc} (its log is above); nothing of it was kept")


def ensure_engine(
    cache_dir: str | os.PathLike,
    opts: BuildOptions,
    revision: str = "main",
    *,
    gpu_arch: str | None = None,
    trtllm: str | None = None,
    build: Callable[[str, Path, BuildOptions, Path], None] = run_engine_build,
) -> Path:
    """Return the cache's engine directory for opts on this node, building it first when the cache lacks it.

    opts.model is a hub id (`org/name[@revision]`, revision defaulting to `revision`), a local directory or
    `default`. gpu_arch and trtllm default to what this machine has. build(model, out_dir, opts, hf_cache) must
    create out_dir as a complete engine directory (with manifest.json); model is what ``nim_build engine`` takes:
    a local directory, ``default``, or ``org/name@commit``.
    """
    cache = Path(cache_dir)
    gpu_arch = gpu_arch or detect_gpu_arch()
    trtllm = trtllm if trtllm is not None else tensorrt_llm_version()
    hf_cache = cache / "hf"
    repo_id, _, at_revision = opts.model.partition("@")
    local = Path(opts.model).expanduser()
    if is_default_model(opts.model):  # the bundled default model: fixed by the nim_build version
        identity, model = f"default-{__version__}", opts.model
    elif local.is_dir():  # its content is its identity, wherever it lies
        cache.mkdir(parents=True, exist_ok=True)
        identity, model = local_fingerprint(local.resolve(), cache / HASHES_FILE), str(local.resolve())
        repo_id = "local"
    else:
        identity = resolve_revision(repo_id, at_revision or revision, hf_cache)
        model = f"{repo_id}@{identity}"
    key = engine_key(repo_id, identity, opts, gpu_arch, trtllm)
    engines = cache / "engines"
    target = engines / f"{_slug(model.partition('@')[0], opts, gpu_arch)}--{key}"
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
            _log(
                f"no engine for this GPU ({gpu_arch}) and TensorRT-LLM ({trtllm or 'not installed'}); "
                f"building {target.name}"
            )
            build(model, out, opts.replace(model=model), hf_cache)
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
