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
    """The process's own cgroup directory first (v2: "0::/path"; v1: "N:memory:/path"), then the root."""
    dirs = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and controller == "":  # v2 unified hierarchy
            dirs.append(root / path.lstrip("/"))
        elif controller and controller in controllers.split(","):
            dirs.append(root / controller / path.lstrip("/"))
    dirs.append(root / controller if controller else root)
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def memory_limit(root: Path | None = None, proc_cgroup: Path | None = None) -> tuple[int, int] | None:
    """(limit, current usage) in bytes of the cgroup this process runs in, or None when it has no memory limit."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    for d in _cgroup_dirs(root, proc_cgroup, ""):  # v2
        limit = _read(d / "memory.max")
        if limit is not None:
            if limit == "max":
                return None
            return int(limit), int(_read(d / "memory.current") or 0)
    for d in _cgroup_dirs(root, proc_cgroup, "memory"):  # v1
        limit = _read(d / "memory.limit_in_bytes")
        if limit is not None:
            if int(limit) >= _V1_UNLIMITED:
                return None
            return int(limit), int(_read(d / "memory.usage_in_bytes") or 0)
    return None


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
    """CPUs this process may use: its affinity mask, capped by the cgroup's CPU quota (rounded up)."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = None
    for d in _cgroup_dirs(root, proc_cgroup, ""):  # v2: "max 100000" or "200000 100000"
        text = _read(d / "cpu.max")
        if text is not None:
            q, _, period = text.partition(" ")
            quota = None if q == "max" else int(q) / int(period or 100000)
            break
    else:
        for d in _cgroup_dirs(root, proc_cgroup, "cpu"):  # v1: quota -1 = none
            q = _read(d / "cpu.cfs_quota_us")
            if q is not None:
                period = int(_read(d / "cpu.cfs_period_us") or 100000)
                quota = None if int(q) <= 0 else int(q) / period
                break
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def configure_torch_threads() -> int:
    """Set torch's intra-op threads to cpu_count() (the container's CPUs, not the node's) unless OMP_NUM_THREADS
    says otherwise (torch reads it itself); returns the count in use."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        n = cpu_count()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch.get_num_threads()
