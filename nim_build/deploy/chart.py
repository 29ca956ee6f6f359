"""Helm values sized from an engine directory's manifest: `nim_build chart ENGINE_DIR --out values.yaml`.

The values file sets what a build measured or decided and leaves the rest to the chart's defaults
(helm/nim-llm/values.yaml), so `helm install NAME helm/nim-llm -f values.yaml` is the step after a build:

- model.id / model.revision: what the build resolved (hub id + commit; the bundled `default` model; a local
  checkpoint must first be copied into the model cache volume, under models/<name>).
- engine.*: every portable build option of the build (nim_build.options.to_chart), so the init container's
  `nim_build cache-engine` runs the same build on the node that serves it (engines are tied to the GPU
  architecture and the TensorRT-LLM version) unless its cache has one.
- gpu: GPU count = tp; nodes restricted to the GPU products of the build GPU's compute capability; a reference
  engine built without a GPU runs on CPU (gpu.enabled false, the `-cpu` image).
- resources: memory for the larger of the build's peak RSS and loading the engine, plus /dev/shm, plus (served on
  CPU) the KV pool of all max_batch_size sequences of max_seq_len, which the runtime then gets in full.
- persistence.size: the Hugging Face checkpoint, the engine directory and a rebuild in flight.
- startupProbe: budget twice the measured build time, at least 10 minutes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from nim_build import KV_CACHE_FREE_MEM_FRACTION, TOKENS_PER_BLOCK, __version__, options
from nim_build.builder.default_model import is_default_model
from nim_build.builder.manifest import load_manifest
from nim_build.errors import ConfigError, OutputExistsError, UserError

GIB = 1 << 30
# Values of the node label nvidia.com/gpu.product (GPU feature discovery: the nvidia-smi name, spaces -> "-")
# by compute capability. The build GPU's own label is always included.
GPU_PRODUCTS = {
    "8.9": ["NVIDIA-L4", "NVIDIA-L40", "NVIDIA-L40S", "NVIDIA-RTX-6000-Ada-Generation"],
    "9.0": [
        "NVIDIA-H100-80GB-HBM3",
        "NVIDIA-H100-PCIe",
        "NVIDIA-H100-NVL",
        "NVIDIA-H200",
        "NVIDIA-H200-NVL",
        "NVIDIA-GH200-480GB",
    ],
    "10.0": ["NVIDIA-B200", "NVIDIA-GB200"],
}
MODELS_SUBDIR = "models"
CACHE_MOUNT = "/opt/nim/cache"  # the chart's persistence.mountPath default
STARTUP_PERIOD_S = 10
MIN_STARTUP_BUDGET_S = 600


def _field(manifest: dict, *keys: str):
    value = manifest
    for k in keys:
        if not isinstance(value, dict) or value.get(k) is None:
            raise UserError(f"the manifest has no {'.'.join(keys)}; rebuild the engine with this nim_build version")
        value = value[k]
    return value


def gpu_products(gpu: dict) -> list[str]:
    """nvidia.com/gpu.product values of the GPUs that share the build GPU's compute capability."""
    own = str(gpu.get("name") or "").strip().replace(" ", "-")
    products = [own] if own else []
    return products + [p for p in GPU_PRODUCTS.get(str(gpu.get("compute_capability")), []) if p not in products]


def _gib(nbytes: float, step: int = 1) -> int:
    return max(step, math.ceil(nbytes / GIB / step) * step)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def kv_cache_memory(manifest: dict) -> float:
    """Container memory for a CPU-served engine's KV pool: the pool takes KV_CACHE_FREE_MEM_FRACTION of the memory
    left after loading the weights (nim_build.runtime.engine), so leave need / fraction for all of max_batch_size
    sequences of max_seq_len."""
    from nim_build.runtime.kv_cache import PagedKVCache
    from nim_build.runtime.model import CPU_COMPUTE_DTYPE

    spec, build = _field(manifest, "spec"), _field(manifest, "build")
    elem = PagedKVCache.element_bytes(build.get("kv_cache_quant_algo") == "FP8", CPU_COMPUTE_DTYPE)
    need = PagedKVCache.full_need(
        int(spec["num_hidden_layers"]),
        TOKENS_PER_BLOCK,
        int(spec["num_key_value_heads"]),
        int(spec["head_size"]),
        elem,
        int(build["max_batch_size"]),
        int(build["max_seq_len"]),
    )
    return need / KV_CACHE_FREE_MEM_FRACTION


def _model_values(manifest: dict) -> tuple[dict, str | None]:
    """model.* values, and a note for the user when the checkpoint must be copied into the cache."""
    source = str(_field(manifest, "model", "source"))
    revision = manifest["model"].get("revision")
    if is_default_model(source):
        return {"id": source, "revision": "main"}, None
    if revision:  # a hub model: the build recorded its commit
        return {"id": source.partition("@")[0], "revision": revision}, None
    name = Path(source.rstrip("/")).name
    cache_path = f"{CACHE_MOUNT}/{MODELS_SUBDIR}/{name}"
    note = (
        f"{source} is a local checkpoint: copy it into the model cache volume as {MODELS_SUBDIR}/{name} "
        f"(mounted at {cache_path}) and install with persistence.existingClaim"
    )
    return {"id": cache_path, "revision": "main"}, note


def chart_values(engine_dir: str | os.PathLike) -> tuple[dict, list[str]]:
    """Helm values for serving the engine in engine_dir, and notes for the user."""
    engine_dir = Path(engine_dir)
    manifest = load_manifest(engine_dir)
    backend = _field(manifest, "backend")
    try:
        opts = options.BuildOptions(
            model=str(_field(manifest, "model", "source")), **_field(manifest, "build", "options")
        )
    except (ConfigError, TypeError) as e:
        raise UserError(f"the manifest's build options are not this nim_build's ({e}); rebuild the engine") from None
    tp = opts.tp
    gpu = manifest.get("gpu")
    notes = []
    model, note = _model_values(manifest)
    if note:
        notes.append(note)
    calib = (manifest.get("build") or {}).get("calib_data")
    if calib not in (None, "built-in"):  # a path on the build machine: the node calibrates with the built-in text
        notes.append(
            f"built with --calib-data {calib}: the chart's init container rebuilds (on a new GPU type or "
            "TensorRT-LLM version) with the built-in calibration text, so its FP8 scales can differ"
        )
    # The chart builds what this build built: its options, with the backend it ended up with (not `auto`).
    values: dict = {"model": model, "engine": options.to_chart(opts.replace(backend=backend))}
    if gpu:
        values["gpu"] = {"enabled": True, "products": gpu_products(gpu)}
    elif backend == "reference":
        values["gpu"] = {"enabled": False, "products": []}
        values["image"] = {"tag": f"{__version__}-cpu"}
        values["tolerations"] = []
        notes.append(f"built without a GPU: the values run the reference backend on CPU (image tag {__version__}-cpu)")
    else:
        raise UserError(f"the manifest of a {backend} engine records no GPU; rebuild it on the target GPU")

    size = _dir_bytes(engine_dir)
    shm_gib = 4 * tp if gpu else 2
    peak_rss = int(manifest.get("peak_rss_bytes") or 0)
    kv = 0 if gpu else kv_cache_memory(manifest)  # on a GPU the KV cache is in GPU memory
    memory_gib = _gib(max(peak_rss * 1.25, size * 1.1 + 4 * GIB) + kv) + shm_gib
    values["resources"] = {
        "requests": {"cpu": str(max(4, 2 * tp)), "memory": f"{memory_gib}Gi"},
        "limits": {"memory": f"{memory_gib}Gi"},
    }
    values["shm"] = {"sizeLimit": f"{shm_gib}Gi"}
    values["persistence"] = {"size": f"{_gib(3 * size + 10 * GIB, step=10)}Gi"}
    build_s = float((manifest.get("timings_s") or {}).get("total") or 0)
    budget = max(MIN_STARTUP_BUDGET_S, 2 * build_s)
    values["startupProbe"] = {
        "periodSeconds": STARTUP_PERIOD_S,
        "failureThreshold": math.ceil(budget / STARTUP_PERIOD_S),
    }
    return values, notes


def store_values(store_dir: str | os.PathLike, node, goal: str, store_path: str) -> tuple[dict, list[str], str]:
    """Helm values for serving the model store in store_dir from the volume's store_path on `node`: sized from the
    profile selection would choose there (its manifest when built, its planned sizes when it builds on the node);
    the pod requests that profile's tp in GPUs, so that the node's selection sees as many. Also returns its name."""
    from nim_build.deploy import profiles as P
    from nim_build.deploy.store import load_store

    store = load_store(store_dir)
    spec, max_seq_len = store.spec(), store.max_seq_len()
    planned = [P.evaluate(e.profile, spec, node, max_seq_len) for e in store.entries]
    notes = []
    if not any(pl.runnable for pl in planned):
        planned = P.plan(spec, node, max_seq_len, store.build)
        notes.append(f"no profile of the store runs on {node.describe()}: the init container builds one on the node")
    profile, _ = P.select(planned, goal)
    if store.built(profile):
        values, more = chart_values(store.profile_dir(profile))
        notes += [n for n in more if "local checkpoint" not in n]
    else:
        values = _planned_values(store, next(pl for pl in planned if pl.profile == profile), node)
        notes.append(f"{profile.name} is built on the node at the first start (TensorRT-LLM builds on its GPU)")
    source = store.model["source"]
    repo_id, _, commit = source.partition("@")
    model = {"id": repo_id, "revision": commit or "main"}
    if Path(source).is_absolute():  # a local checkpoint: the store holds every profile the chart may need
        model = {"id": f"{CACHE_MOUNT}/{MODELS_SUBDIR}/{Path(source).name}", "revision": "main"}
        notes.append(
            f"{source} is a local checkpoint: copy it into the volume as {MODELS_SUBDIR}/{Path(source).name} "
            "if the node may have to build a profile"
        )
    values["model"] = {**model, "store": store_path, "profile": "auto", "profileGoal": goal}
    notes.append(f"copy {Path(store_dir).resolve()} onto the cache volume as {store_path} (persistence.existingClaim)")
    return values, notes, profile.name


def _planned_values(store, planned, node) -> dict:
    """Values for a profile that is not built yet: from its planned sizes."""
    from nim_build.deploy import profiles as P

    profile = planned.profile
    opts = options.BuildOptions(
        model=store.model["source"],
        **store.build,
        **{k: getattr(profile, k) for k in P.PROFILE_FIELDS},
    )
    total = planned.weights_per_gpu * profile.tp
    gpu = profile.gpu != "cpu"
    values: dict = {"engine": options.to_chart(opts)}
    if gpu:
        product = node.gpu if node.gpu and node.gpu.name == profile.gpu else None
        labels = [n.replace(" ", "-") for n in (product.smi_names if product else ())]
        values["gpu"] = {"enabled": True, "products": labels}
    else:
        values["gpu"] = {"enabled": False, "products": []}
        values["image"] = {"tag": f"{__version__}-cpu"}
        values["tolerations"] = []
    shm_gib = 4 * profile.tp if gpu else 2
    memory_gib = _gib(total * 1.25 + 4 * GIB) + shm_gib
    values["resources"] = {
        "requests": {"cpu": str(max(4, 2 * profile.tp)), "memory": f"{memory_gib}Gi"},
        "limits": {"memory": f"{memory_gib}Gi"},
    }
    values["shm"] = {"sizeLimit": f"{shm_gib}Gi"}
    values["persistence"] = {"size": f"{_gib(3 * total + 10 * GIB, step=10)}Gi"}
    return values


def write_values(
    engine_dir: str | os.PathLike,
    out: str | os.PathLike,
    force: bool = False,
    *,
    node=None,
    goal: str = "throughput",
    store_path: str | None = None,
) -> tuple[Path, list[str]]:
    """Write chart_values(engine_dir) (store_values for a model store, for `node`, default this one) as a commented
    YAML file; returns its path and the notes."""
    from nim_build.deploy.store import is_store

    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if is_store(engine_dir):
        from nim_build.deploy.profiles import detect_node

        node = node or detect_node()
        store_path = store_path or f"stores/{Path(engine_dir).resolve().name}"
        values, notes, chosen = store_values(engine_dir, node, goal, store_path)
        what, name = f"model store, profile {chosen} on {node.describe()}", Path(engine_dir).resolve().name
    else:
        values, notes = chart_values(engine_dir)
        manifest = load_manifest(engine_dir)
        what, name = f"engine {manifest.get('name')}", manifest.get("name")
    header = [
        f"# Helm values for the nim-llm chart, written by nim_build {__version__} `nim_build chart` from",
        f"# {Path(engine_dir).resolve()} ({what}).",
        "# Sized from the build manifest; every other value keeps the chart's default (helm/nim-llm/values.yaml).",
        f"# Next: helm install {_release_name(name)} helm/nim-llm -f {out.name}",
        *[f"# Note: {n}" for n in notes],
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(header) + "\n" + yaml.safe_dump(values, sort_keys=False))
    os.replace(tmp, out)
    return out, notes


def _release_name(name: str | None) -> str:
    name = "".join(c if c.isalnum() else "-" for c in str(name or "llm").lower()).strip("-")
    return (name or "llm")[:40].rstrip("-")
