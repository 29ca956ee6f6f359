"""Memory and CPUs from the container's cgroup (v2 and v1, read from fake cgroup trees), and the reference
runtime's KV pool sized from them: the fraction of the memory left that kv_cache_free_gpu_mem_fraction allows,
never the host's free memory, and in agreement with the memory `nim_build chart` gives the pod."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from nim_build import KV_CACHE_FREE_MEM_FRACTION, limits

GIB = 1 << 30


def cgroup_v2(root: Path, *, limit: str, current: int, cpu: str = "max 100000", path: str = "kubepods/pod1") -> Path:
    """A cgroup v2 tree with the process in `path` (as /proc/self/cgroup says)."""
    d = root / "fs" / path
    d.mkdir(parents=True)
    (d / "memory.max").write_text(f"{limit}\n")
    (d / "memory.current").write_text(f"{current}\n")
    (d / "cpu.max").write_text(f"{cpu}\n")
    (root / "cgroup").write_text(f"0::/{path}\n")
    return root


def cgroup_v1(root: Path, *, limit: int, usage: int, quota: int = -1, period: int = 100000) -> Path:
    """A cgroup v1 hierarchy as a Docker container sees it (controllers mounted at their root)."""
    (root / "fs" / "memory").mkdir(parents=True)
    (root / "fs" / "memory" / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (root / "fs" / "memory" / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (root / "fs" / "cpu").mkdir()
    (root / "fs" / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "fs" / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    (root / "cgroup").write_text("12:memory:/\n4:cpu,cpuacct:/\n0::/\n")
    return root


def use(monkeypatch, root: Path) -> None:
    monkeypatch.setattr(limits, "CGROUP_ROOT", root / "fs")
    monkeypatch.setattr(limits, "PROC_CGROUP", root / "cgroup")


def test_v2_limit_caps_what_the_host_has(tmp_path, monkeypatch):
    use(monkeypatch, cgroup_v2(tmp_path, limit=str(8 * GIB), current=3 * GIB, cpu="150000 100000"))
    mem = limits.memory()
    assert (mem.limit, mem.used) == (8 * GIB, 3 * GIB)
    assert mem.available == min(5 * GIB, psutil.virtual_memory().available)
    assert "container memory limit 8.0 GiB, 3.0 GiB used" in mem.describe()
    assert limits.cpu_count() == min(2, len(psutil.Process().cpu_affinity()))  # 1.5 CPUs: 2 threads


def test_v2_counts_the_working_set_and_the_tightest_ancestor(tmp_path, monkeypatch):
    """Page cache the kernel can drop (a checkpoint just read) is not used memory; a limit on the pod's cgroup holds
    for the container's child cgroup that has none."""
    root = cgroup_v2(tmp_path, limit="max", current=GIB, path="kubepods/pod1/container")
    pod = root / "fs" / "kubepods" / "pod1"
    (pod / "memory.max").write_text(f"{6 * GIB}\n")
    (pod / "memory.current").write_text(f"{5 * GIB}\n")
    (pod / "memory.stat").write_text(f"anon {GIB}\ninactive_file {3 * GIB}\nactive_file 0\n")
    use(monkeypatch, root)
    assert limits.memory_limit() == (6 * GIB, 2 * GIB)


def test_v2_without_limits_is_the_host(tmp_path, monkeypatch):
    use(monkeypatch, cgroup_v2(tmp_path, limit="max", current=GIB))
    mem = limits.memory()
    assert mem.limit is None and mem.available == mem.host_available and "no container memory limit" in mem.describe()
    assert limits.cpu_count() == len(psutil.Process().cpu_affinity())


def test_v1_limit_and_quota(tmp_path, monkeypatch):
    use(monkeypatch, cgroup_v1(tmp_path, limit=6 * GIB, usage=GIB, quota=100000))
    assert limits.memory_limit() == (6 * GIB, GIB)
    assert limits.cpu_count() == 1
    use(monkeypatch, cgroup_v1(tmp_path / "unlimited", limit=9223372036854771712, usage=GIB))
    assert limits.memory_limit() is None


def test_torch_threads_follow_the_cpu_quota(tmp_path, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        use(monkeypatch, cgroup_v2(tmp_path, limit="max", current=0, cpu="100000 100000"))  # one CPU
        assert limits.configure_torch_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting wins
        torch.set_num_threads(2)
        assert limits.configure_torch_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_override_wins_over_the_cpu_quota(tmp_path, monkeypatch):
    """--threads (NIM_BUILD_THREADS, what serve passes to Triton's engine processes) beats the quota and
    OMP_NUM_THREADS; a bad value is an error, not a silent default."""
    import torch

    before = torch.get_num_threads()
    use(monkeypatch, cgroup_v2(tmp_path, limit="max", current=0, cpu="200000 100000"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        monkeypatch.setenv(limits.THREADS_ENV, "1")
        assert limits.configure_torch_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv(limits.THREADS_ENV, "zero")
        with pytest.raises(ValueError, match="NIM_BUILD_THREADS='zero'"):
            limits.configure_torch_threads()
    finally:
        torch.set_num_threads(before)


def test_serve_threads_reach_the_engine_processes(tmp_path, monkeypatch):
    from nim_build.serving.server import TritonServer

    monkeypatch.delenv(limits.THREADS_ENV, raising=False)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"')
    env = TritonServer(tmp_path, threads=3).env(Path("/bin/true"))
    assert env[limits.THREADS_ENV] == "3"
    assert limits.THREADS_ENV not in TritonServer(tmp_path).env(Path("/bin/true"))


def test_serve_compute_dtype_reaches_the_engine_and_picks_its_dtype(tmp_path, monkeypatch):
    """serve --compute-dtype travels in NIM_BUILD_COMPUTE_DTYPE; the engine reads it, and auto follows the CPU."""
    import torch

    from nim_build import COMPUTE_DTYPE_ENV
    from nim_build.errors import UserError
    from nim_build.runtime.linear import native_bf16_cpu
    from nim_build.runtime.model import serving_compute_dtype
    from nim_build.serving.server import TritonServer

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"')
    assert TritonServer(tmp_path, compute_dtype="float32").env(Path("/bin/true"))[COMPUTE_DTYPE_ENV] == "float32"
    monkeypatch.setenv(COMPUTE_DTYPE_ENV, "float32")
    assert serving_compute_dtype("cpu") == torch.float32
    monkeypatch.setenv(COMPUTE_DTYPE_ENV, "auto")
    assert serving_compute_dtype("cpu") == (torch.bfloat16 if native_bf16_cpu() else torch.float32)
    assert serving_compute_dtype("cuda") is None  # the checkpoint's dtype
    monkeypatch.setenv(COMPUTE_DTYPE_ENV, "fp64")
    with pytest.raises(UserError, match="NIM_BUILD_COMPUTE_DTYPE='fp64'"):
        serving_compute_dtype("cpu")


@pytest.fixture(scope="module")
def engine_model(reference_engine_dir):
    from nim_build.runtime import DecoderModel

    return DecoderModel.from_checkpoint(reference_engine_dir / "checkpoint")


def _engine(model, **kw):
    from nim_build.runtime import LLMEngine

    return LLMEngine(model, max_seq_len=512, max_batch_size=32, end_id=-1, **kw)


def test_kv_pool_takes_the_fraction_of_the_container_not_the_host(engine_model, tmp_path, monkeypatch):
    """In an 8 GiB pod on a big node the pool is sized from the pod; kv_cache_free_gpu_mem_fraction is honoured."""
    from nim_build.runtime.kv_cache import PagedKVCache

    c = engine_model.cfg
    per_block = PagedKVCache.bytes_per_block(c.num_layers, 32, c.num_kv_heads, c.head_size, 4)
    need_blocks = 32 * 512 // 32
    free = 100 * per_block  # far less than the full need (512 blocks)
    use(monkeypatch, cgroup_v2(tmp_path, limit=str(8 * GIB), current=8 * GIB - free))
    for fraction in (0.9, 0.3):
        engine = _engine(engine_model, kv_cache_free_mem_fraction=fraction)
        assert engine.allocator.total == int(free * fraction) // per_block < need_blocks
        assert f"{fraction:g} of" in engine.kv_cache_note and "container memory limit 8.0 GiB" in engine.kv_cache_note
    use(monkeypatch, cgroup_v2(tmp_path / "roomy", limit=str(64 * GIB), current=GIB))
    engine = _engine(engine_model)
    assert engine.allocator.total == need_blocks and "enough for max_batch_size x max_seq_len" in engine.kv_cache_note


def test_chart_memory_gives_the_runtime_its_whole_kv_pool(reference_engine_dir, engine_model, tmp_path, monkeypatch):
    """The memory limit `nim_build chart` writes for a CPU pod holds what loading the engine really takes plus the
    KV pool the runtime then sizes in full (max_batch_size x max_seq_len), at the repository's default fraction."""
    from nim_build.builder.manifest import load_manifest
    from nim_build.deploy.chart import chart_values, kv_cache_memory

    values, _ = chart_values(reference_engine_dir)
    limit = int(values["resources"]["limits"]["memory"].removesuffix("Gi")) * GIB
    shm = int(values["shm"]["sizeLimit"].removesuffix("Gi")) * GIB
    kv_share = kv_cache_memory(load_manifest(reference_engine_dir))
    loaded = _rss_after_loading(reference_engine_dir)  # a process like the tensorrt_llm stub, engine loaded
    assert loaded < limit - shm - kv_share, "the chart leaves too little for loading the engine"
    use(monkeypatch, cgroup_v2(tmp_path, limit=str(limit), current=int(limit - kv_share)))
    engine = _engine(engine_model)  # everything but the KV share already used: the pool still gets its full need
    assert engine.allocator.total == 32 * 512 // 32
    assert KV_CACHE_FREE_MEM_FRACTION == 0.9


def _rss_after_loading(engine_dir: Path) -> int:
    import subprocess
    import sys

    code = (
        "import psutil; from nim_build.runtime import LLMEngine; "
        f"LLMEngine.from_engine_dir({str(engine_dir)!r}); print(psutil.Process().memory_info().rss)"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_a_compute_dtype_set_for_the_container_is_the_options_default(monkeypatch):
    """NIM_BUILD_COMPUTE_DTYPE set in the environment is `serve` / `run --compute-dtype`'s default, and the flag
    still wins: serve used to pass its own default, auto, to the engine over a float32 set for the container."""
    import click
    from click.testing import CliRunner

    from nim_build import COMPUTE_DTYPE_ENV
    from nim_build.cli._options import compute_dtype_option

    @click.command()
    @compute_dtype_option
    def show(compute_dtype):
        click.echo(compute_dtype)

    monkeypatch.setenv(COMPUTE_DTYPE_ENV, "float32")
    assert CliRunner().invoke(show, []).output.strip() == "float32"
    assert CliRunner().invoke(show, ["--compute-dtype", "bfloat16"]).output.strip() == "bfloat16"
    monkeypatch.delenv(COMPUTE_DTYPE_ENV)
    assert CliRunner().invoke(show, []).output.strip() == "auto"
