"""What this process may use: memory and CPUs from the container's cgroup limits (v2 and v1), not the host's.

In a pod with an 8 GiB limit on a 512 GB node, the host's free memory is irrelevant: sizing from it gets the
process OOM-killed at start; with a 2-CPU quota on a 64-core node, 64 torch threads fight over 2 CPUs. Every "how
much can I take" question (the reference runtime's KV-cache pool, torch's thread count) goes through here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_V1_UNLIMITED = 1 << 60  # cgroup v1 writes a huge number (PAGE_COUNTER_MAX pages) for "no limit"


@dataclass(frozen=True)
class Memory:
    available: int  # bytes this process can still allocate
    limit: int | None  # the cgroup's limit, None without one
    used: int | None  # the cgroup's current usage, None without a limit
    host_available: int  # the host's available memory

    def describe(self) -> str:
        gib = 1 << 30
        if self.limit is None:
            return f"{self.available / gib:.1f} GiB available on the host (no container memory limit)"
        return (
            f"{self.available / gib:.1f} GiB available: container memory limit {self.limit / gib:.1f} GiB, "
            f"{self.used / gib:.1f} GiB used"
        )


def _cgroup_dirs(root: Path, proc_cgroup: Path, controller: str) -> list[Path]:
    """The process's own cgroup directory (v2: "0::/path"; v1: "N:memory:/path") and its ancestors up to the
    hierarchy's root: a limit set on any of them applies."""
    base = root / controller if controller else root
    path = "/"
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, where = (line.split(":", 2) + ["", ""])[:3]
            if (controller == "" and controllers == "") or (controller and controller in controllers.split(",")):
                path = where
    except OSError:
        pass
    own = base / path.lstrip("/")
    return [own, *[d for d in own.parents if d.is_relative_to(base)]] if own != base else [base]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat(d: Path, key: str) -> int:
    """A counter of d/memory.stat (0 when absent)."""
    for line in (_read(d / "memory.stat") or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def memory_limit(root: Path | None = None, proc_cgroup: Path | None = None) -> tuple[int, int] | None:
    """(limit, working set) in bytes of the tightest memory limit on this process's cgroup or its ancestors, or
    None without one. The working set is usage minus the inactive file cache (what kubelet counts, and what the
    kernel reclaims before it would kill): a checkpoint just read does not count as used."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    v2 = [d for d in _cgroup_dirs(root, proc_cgroup, "") if (d / "memory.max").is_file()]
    levels = []
    if v2:
        for d in v2:
            limit = _read(d / "memory.max")
            if limit and limit != "max":
                used = int(_read(d / "memory.current") or 0) - _stat(d, "inactive_file")
                levels.append((int(limit), max(used, 0)))
    else:
        for d in _cgroup_dirs(root, proc_cgroup, "memory"):
            limit = _read(d / "memory.limit_in_bytes")
            if limit and limit.isdigit() and int(limit) < _V1_UNLIMITED:
                used = int(_read(d / "memory.usage_in_bytes") or 0) - _stat(d, "total_inactive_file")
                levels.append((int(limit), max(used, 0)))
    return min(levels, key=lambda lu: lu[0] - lu[1]) if levels else None


def memory(root: Path | None = None, proc_cgroup: Path | None = None) -> Memory:
    """Memory this process may still take: the host's available memory, capped by the container's limit."""
    import psutil

    host = psutil.virtual_memory().available
    cgroup = memory_limit(root, proc_cgroup)
    if cgroup is None:
        return Memory(host, None, None, host)
    limit, used = cgroup
    return Memory(max(0, min(host, limit - used)), limit, used, host)


def cpu_count(root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by the tightest CPU quota on its cgroup or its
    ancestors (rounded up)."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quotas = []
    v2 = [d for d in _cgroup_dirs(root, proc_cgroup, "") if (d / "cpu.max").is_file()]
    for d in v2:  # "max 100000" or "200000 100000"
        q, _, period = (_read(d / "cpu.max") or "max").partition(" ")
        if q.isdigit():
            quotas.append(int(q) / int(period or 100000))
    for d in [] if v2 else _cgroup_dirs(root, proc_cgroup, "cpu"):  # v1: quota -1 = none
        q = _read(d / "cpu.cfs_quota_us")
        if q and q.lstrip("-").isdigit() and int(q) > 0:
            quotas.append(int(q) / int(_read(d / "cpu.cfs_period_us") or 100000))
    return max(1, min(cpus, math.ceil(min(quotas)))) if quotas else cpus


THREADS_ENV = "NIM_BUILD_THREADS"  # `--threads` of serve and run: torch's threads in every engine process


def configure_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: `threads`, else NIM_BUILD_THREADS, else OMP_NUM_THREADS (torch reads it
    itself), else cpu_count() (the container's CPUs, not the node's); returns the count in use. Two servers on one
    machine each see all its CPUs: give each its share with --threads."""
    import torch

    if threads is None and os.environ.get(THREADS_ENV):
        raw = os.environ[THREADS_ENV]
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r} is not a positive integer")
        threads = int(raw)
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = threads or cpu_count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
