"""Profiles: the complete build options for one target, which of them a node can run, and which one it runs.

A profile is backend + precision (quant, KV cache) + tensor parallelism + target (a GPU product, or cpu) + an
optimisation goal. `plan` lists the profiles that make sense for a model (tp divides its heads) on a node's GPU
product and on CPU, each runnable on that node or not, with the reasons; `select` picks one (docs/PROFILES.md):

    runnable here -> trtllm over reference -> lower precision -> the wanted goal -> higher tp for latency
                                                                                    (lower tp for throughput)

Memory rule (per GPU, GPU memory x KV_CACHE_FREE_MEM_FRACTION usable, as TensorRT-LLM keeps the rest):
the weights may take at most WEIGHT_SHARE of it, so that the KV cache gets the rest (a useful cache, not one
sequence), and one max_seq_len sequence's KV cache must fit beside them. `throughput` is the fewest GPUs that
pass it; every larger tp is `latency`. Nothing is read but config.json: the sizes come from the converter's own
plan (convert.planned_bytes), the same bytes a build writes.

The node is described as "PRODUCT xCOUNT" ("H100-SXM x8", "L40S x2") or "cpu"; `detect_node` reads nvidia-smi,
or the description in NIM_BUILD_GPUS when set (to plan for, or test with, a node other than this one). In a
multi-node group (a LeaderWorkerSet: LWS_GROUP_SIZE pods) the node is the group: its pods' GPUs together.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field

from nim_build import KV_CACHE_FREE_MEM_FRACTION
from nim_build.builder.trtllm_adapter import FP8_MIN_COMPUTE_CAPABILITY
from nim_build.errors import ConfigError, UserError

GPUS_ENV = "NIM_BUILD_GPUS"  # a node description that replaces detection
PROFILE_ENV = "NIM_BUILD_PROFILE"  # the override of --profile
GROUP_SIZE_ENV = "LWS_GROUP_SIZE"  # pods in a LeaderWorkerSet group (set by LWS in each of them)
GOALS = ("throughput", "latency")
WEIGHT_SHARE = 0.5  # the most of a GPU's usable memory the weights may take; the rest is the KV cache's
GIB = 1 << 30
PROFILE_FIELDS = ("backend", "quant", "kv_cache", "tp")  # the build options a profile sets; the store sets the rest


@dataclass(frozen=True)
class GpuProduct:
    name: str  # as profiles spell it: H100-SXM
    compute_capability: tuple[int, int]
    memory_mib: int  # memory.total as nvidia-smi reports it
    smi_names: tuple[str, ...] = ()  # nvidia-smi's names for it

    @property
    def arch(self) -> str:
        return "sm{}{}".format(*self.compute_capability)


# The GPUs profiles are planned for by name; a detected GPU that is not here is described by nvidia-smi's figures.
GPU_PRODUCTS = {
    p.name.lower(): p
    for p in (
        GpuProduct("B200", (10, 0), 183359, ("NVIDIA B200",)),
        GpuProduct("H200", (9, 0), 143771, ("NVIDIA H200",)),
        GpuProduct("H100-NVL", (9, 0), 95830, ("NVIDIA H100 NVL",)),
        GpuProduct("H100-SXM", (9, 0), 81559, ("NVIDIA H100 80GB HBM3",)),
        GpuProduct("H100-PCIe", (9, 0), 81559, ("NVIDIA H100 PCIe",)),
        GpuProduct("L40S", (8, 9), 46068, ("NVIDIA L40S",)),
        GpuProduct("L4", (8, 9), 23034, ("NVIDIA L4",)),
        GpuProduct("A100-80GB", (8, 0), 81920, ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe")),
        GpuProduct("A100-40GB", (8, 0), 40960, ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB")),
        GpuProduct("A10G", (8, 6), 23028, ("NVIDIA A10G",)),
    )
}


@dataclass(frozen=True)
class Node:
    """What a node offers: `count` GPUs of one product (none: a CPU node), and the memory a CPU engine may take
    (None: unknown, not checked)."""

    gpu: GpuProduct | None = None
    count: int = 0
    cpu_memory: int | None = None

    def describe(self) -> str:
        return f"{self.gpu.name} x{self.count}" if self.gpu else "cpu"


_DESCRIPTION = re.compile(r"^\s*(?P<product>[A-Za-z0-9._-]+)\s*(?:[x*]\s*(?P<count>\d+))?\s*$")


def parse_node(description: str) -> Node:
    """A node from "PRODUCT xCOUNT" (count 1 when left out) or "cpu"."""
    m = _DESCRIPTION.match(description)
    if m and m["product"].lower() == "cpu" and not m["count"]:
        return Node()
    known = ", ".join(p.name for p in GPU_PRODUCTS.values())
    if not m:
        raise ConfigError(f"--gpus {description!r}: expected 'PRODUCT xCOUNT' (e.g. 'H100-SXM x8'), 'cpu' or 'auto'")
    product = GPU_PRODUCTS.get(m["product"].lower())
    if product is None:
        raise ConfigError(f"--gpus {description!r}: unknown GPU {m['product']!r}; known: {known}")
    count = int(m["count"] or 1)
    if count < 1:
        raise ConfigError(f"--gpus {description!r}: a node has at least one GPU (or say 'cpu')")
    return Node(product, count)


def detect_node(description: str | None = None, smi_output: str | None = None) -> Node:
    """This node: `description` ("auto" or None: NIM_BUILD_GPUS when set, else nvidia-smi's GPUs, else cpu with the
    memory this process may take)."""
    description = description if description not in (None, "auto") else os.environ.get(GPUS_ENV)
    if description:
        return parse_node(description)
    if smi_output is None:
        try:
            smi_output = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            smi_output = ""
    from nim_build import limits

    rows = [[c.strip() for c in line.split(",")] for line in smi_output.splitlines() if line.strip()]
    cpu_memory = limits.memory().available
    if not rows:
        return Node(cpu_memory=cpu_memory)
    if len({r[0] for r in rows}) > 1:
        raise UserError(
            f"the node's GPUs differ ({', '.join(sorted({r[0] for r in rows}))}); a profile runs on identical "
            "GPUs: schedule the pod on one product (Helm value gpu.products)"
        )
    name, memory_mib, cap = rows[0][:3]
    product = next((p for p in GPU_PRODUCTS.values() if name in p.smi_names), None)
    if product is None:  # not in the catalogue: nvidia-smi's own figures
        major, minor = cap.split(".")
        product = GpuProduct(
            re.sub(r"[^A-Za-z0-9]+", "-", name.removeprefix("NVIDIA ")),
            (int(major), int(minor)),
            int(float(memory_mib)),
            (name,),
        )
    # a LeaderWorkerSet group (multi-node): every pod of the group has as many GPUs as this one
    return Node(product, len(rows) * int(os.environ.get(GROUP_SIZE_ENV) or 1), cpu_memory)


@dataclass(frozen=True)
class Profile:
    backend: str  # trtllm | reference
    quant: str  # fp8 | bf16
    kv_cache: str  # auto | fp8
    tp: int
    gpu: str  # a GPU product's name, or "cpu"
    goal: str = "throughput"
    build: dict = field(default_factory=dict, compare=False)  # the other build options (options.cache_key_fields)

    @property
    def precision(self) -> str:
        return self.quant + ("-fp8kv" if self.kv_cache == "fp8" else "")

    @property
    def name(self) -> str:
        if self.gpu == "cpu":  # one tp, one goal
            return f"{self.backend}-cpu-{self.precision}-tp{self.tp}"
        return f"{self.backend}-{self.gpu.lower()}-{self.precision}-tp{self.tp}-{self.goal}"

    @property
    def id(self) -> str:
        """sha256 of every option the profile builds with: the same options give the same id anywhere."""
        fields = {**self.options(), "build": self.build}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def options(self) -> dict:
        return {
            "backend": self.backend,
            "quant": self.quant,
            "kv_cache": self.kv_cache,
            "tp": self.tp,
            "gpu": self.gpu,
            "goal": self.goal,
        }

    def to_dict(self) -> dict:
        return {"name": self.name, "id": self.id, **self.options()}


def shared_build(opts) -> dict:
    """The build options of BuildOptions opts that every profile of a store shares (those of the engine cache's key
    that a profile does not set)."""
    from nim_build.options import cache_key_fields

    return {k: v for k, v in cache_key_fields(opts).items() if k not in PROFILE_FIELDS}


# (quant, kv_cache) of each backend, the lowest precision first: the order selection prefers
PRECISIONS = {
    "trtllm": (("fp8", "fp8"), ("fp8", "auto"), ("bf16", "auto")),
    "reference": (("fp8", "auto"), ("bf16", "auto")),
}
BACKEND_ORDER = ("trtllm", "reference")


@dataclass
class Planned:
    profile: Profile
    reasons: list[str]  # why this node cannot run it; empty: runnable
    weights_per_gpu: int  # bytes (per process on CPU)
    kv_bytes_per_token: int  # per GPU

    @property
    def runnable(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {
            **self.profile.to_dict(),
            "runnable": self.runnable,
            "reasons": self.reasons,
            "weights_gib_per_gpu": round(self.weights_per_gpu / GIB, 2),
            "kv_cache_mib_per_1k_tokens": round(self.kv_bytes_per_token * 1024 / (1 << 20), 1),
        }


def _sizes(spec, quant: str, kv_cache: str, tp: int) -> tuple[int, int]:
    """(weight bytes per GPU, KV-cache bytes per token per GPU) of a build: the converter's own plan."""
    from nim_build.builder.convert import planned_spec_bytes
    from nim_build.builder.plan import make_plan

    plan = make_plan(spec, tp)
    weights = planned_spec_bytes(spec, plan, quant=quant, kv_cache=kv_cache) // tp
    from nim_build.formats import torch_dtype
    from nim_build.options import UNQUANTIZED_DTYPES

    kv_elem = 1 if kv_cache == "fp8" else torch_dtype(UNQUANTIZED_DTYPES.get(quant, spec.dtype)).itemsize
    return weights, 2 * spec.num_hidden_layers * plan.kv_heads_per_rank * spec.head_size * kv_elem


def _fits(weights: int, kv_token: int, memory: int, max_seq_len: int, what: str) -> str | None:
    """Why weights and a useful KV cache (kv_token bytes a token) do not fit `memory` (bytes per GPU or process)."""
    usable = memory * KV_CACHE_FREE_MEM_FRACTION
    if weights > usable * WEIGHT_SHARE:
        return (
            f"its weights take {weights / GIB:.1f} GiB per {what}, more than {WEIGHT_SHARE:.0%} of the "
            f"{usable / GIB:.1f} GiB usable (the rest is the KV cache's)"
        )
    if weights + kv_token * max_seq_len > usable:
        return (
            f"one {max_seq_len}-token sequence's KV cache ({kv_token * max_seq_len / GIB:.1f} GiB) does not fit "
            f"beside its weights ({weights / GIB:.1f} GiB) in the {usable / GIB:.1f} GiB usable"
        )
    return None


def _tps(spec) -> list[int]:
    from nim_build.builder.plan import make_plan
    from nim_build.options import TP_SIZES

    out = []
    for tp in TP_SIZES:
        try:
            make_plan(spec, tp)
        except ConfigError:
            continue
        out.append(tp)
    return out


def evaluate(profile: Profile, spec, node: Node, max_seq_len: int) -> Planned:
    """profile as `node` would run it: its sizes and why it cannot run there (memory, then hardware)."""
    weights, kv_token = _sizes(spec, profile.quant, profile.kv_cache, profile.tp)
    if profile.gpu == "cpu":
        memory, what = node.cpu_memory, "process"
    else:
        same = node.gpu if node.gpu and node.gpu.name == profile.gpu else None  # a detected, uncatalogued GPU
        product = GPU_PRODUCTS.get(profile.gpu.lower()) or same
        memory, what = (product.memory_mib << 20 if product else None), "GPU"
    misfit = _fits(weights, kv_token, memory, max_seq_len, what) if memory else None
    return Planned(profile, ([misfit] if misfit else []) + node_reasons(profile, node), weights, kv_token)


def plan(spec, node: Node, max_seq_len: int, build: dict | None = None) -> list[Planned]:
    """The profiles that make sense for the model on node's GPU product and on CPU, runnable or not (and why)."""
    build = build or {}
    out: list[Planned] = []
    if node.gpu is not None:
        memory = node.gpu.memory_mib << 20
        tps = _tps(spec)
        for quant, kv in PRECISIONS["trtllm"]:
            misfit = {tp: _fits(*_sizes(spec, quant, kv, tp), memory, max_seq_len, "GPU") for tp in tps}
            fitting = [tp for tp in tps if misfit[tp] is None]
            for tp in tps:
                goal = "latency" if fitting and tp > fitting[0] else "throughput"
                profile = Profile("trtllm", quant, kv, tp, node.gpu.name, goal, build)
                out.append(evaluate(profile, spec, node, max_seq_len))
    for quant, kv in PRECISIONS["reference"]:
        out.append(evaluate(Profile("reference", quant, kv, 1, "cpu", "throughput", build), spec, node, max_seq_len))
    return out


def node_reasons(profile: Profile, node: Node) -> list[str]:
    """Why node cannot run profile, from the hardware alone (memory is evaluate's)."""
    if profile.gpu == "cpu":
        return []
    if node.gpu is None:
        return [f"{profile.backend} needs {profile.tp} {profile.gpu} GPU(s); this node has no GPU"]
    reasons = []
    if profile.gpu.lower() != node.gpu.name.lower():
        reasons.append(f"built for {profile.gpu}; this node has {node.gpu.name}")
    fp8 = profile.quant.startswith("fp8") or profile.kv_cache == "fp8"
    if fp8 and node.gpu.compute_capability < FP8_MIN_COMPUTE_CAPABILITY:
        need, have = (".".join(map(str, c)) for c in (FP8_MIN_COMPUTE_CAPABILITY, node.gpu.compute_capability))
        reasons.append(f"FP8 needs compute capability >= {need}; {node.gpu.name} has {have}")
    if profile.tp > node.count:
        reasons.append(f"tp {profile.tp} needs {profile.tp} GPUs; the node has {node.count}")
    return reasons


def _rank(profile: Profile, goal: str) -> tuple:
    """Sort key of the selection rule (smaller is better)."""
    precisions = [f"{q}/{k}" for q, k in PRECISIONS[profile.backend]]
    return (
        BACKEND_ORDER.index(profile.backend),
        precisions.index(f"{profile.quant}/{profile.kv_cache}"),
        profile.goal != goal,
        -profile.tp if goal == "latency" else profile.tp,
    )


def _why_below(p: Profile, chosen: Profile, goal: str) -> str:
    a, b = _rank(p, goal), _rank(chosen, goal)
    if a[0] != b[0]:
        return f"{chosen.backend} is preferred to {p.backend}"
    if a[1] != b[1]:
        return f"{chosen.precision} is preferred to {p.precision} (lower precision first)"
    if a[2] != b[2]:
        return f"the goal is {goal}, this profile's {p.goal}"
    return f"tp {chosen.tp} is preferred to tp {p.tp} for {goal}"


def find(profiles: list[Profile], wanted: str) -> Profile:
    """The profile named or identified by `wanted`, or a UserError listing the names."""
    for p in profiles:
        if wanted in (p.name, p.id):
            return p
    names = ", ".join(p.name for p in profiles) or "none"
    raise UserError(f"no profile {wanted!r} here; the profiles are: {names} (`nim_build profiles` lists them)")


def select(
    planned: list[Planned], goal: str = "throughput", override: str | None = None
) -> tuple[Profile, list[tuple[Profile, str]]]:
    """(the profile to run, [(every other profile, why it was not chosen)]). override: a name or id that must be
    runnable (its reasons are the error)."""
    if goal not in GOALS:
        raise ConfigError(f"profile goal {goal!r} is not one of {', '.join(GOALS)}")
    reasons = {pl.profile: pl.reasons for pl in planned}
    if override:
        chosen = find(list(reasons), override)
        if reasons[chosen]:
            raise UserError(f"profile {chosen.name} cannot run on this node: {'; '.join(reasons[chosen])}")
        why = {p: f"profile {chosen.name} was asked for" for p in reasons if p != chosen}
    else:
        runnable = sorted((p for p, r in reasons.items() if not r), key=lambda p: _rank(p, goal))
        if not runnable:
            detail = "; ".join(f"{p.name}: {r[0]}" for p, r in reasons.items()) or "no profiles"
            raise UserError(f"no profile can run on this node ({detail})")
        chosen = runnable[0]
        why = {p: _why_below(p, chosen, goal) for p in runnable[1:]}
    rejected = [(p, "; ".join(r) if r else why[p]) for p, r in reasons.items() if p != chosen]
    return chosen, rejected


def profile_from_dict(d: dict) -> Profile:
    """A Profile from its to_dict() / the store manifest's entry (name and id are derived, then checked)."""
    p = Profile(d["backend"], d["quant"], d["kv_cache"], d["tp"], d["gpu"], d["goal"], d.get("build", {}))
    if d.get("id") not in (None, p.id):
        raise UserError(f"profile {d.get('name')}: its id {d['id']} does not match its options ({p.id})")
    return p
