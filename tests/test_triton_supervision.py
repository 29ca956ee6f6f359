"""`nim_build serve` supervision: Triton keeps reporting ready after a python stub died, serve notices with a
real request and exits non-zero with the reason (so an orchestrator restarts it).

It kills a model of the session's server on purpose, so it runs after every other test (conftest.py).
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import psutil
import pytest


@pytest.mark.kills_session_server
def test_dead_stub_makes_serve_exit_nonzero(triton_serve):
    started = psutil.Process(triton_serve.proc.pid).children(recursive=True)
    stubs = [
        p
        for p in started
        if "triton_python_backend_stub" in p.name() and any("preprocessing" in a for a in p.cmdline())
    ]
    assert stubs, "no preprocessing stub found"
    stubs[0].kill()
    time.sleep(1)
    # Triton itself still says ready...
    assert urllib.request.urlopen(f"http://{triton_serve.http_url}/v2/health/ready", timeout=5).status == 200
    # ...but serve's health request fails and it exits: code 4, serving failed (not 2: the input was fine).
    triton_serve.proc.wait(timeout=90)
    assert triton_serve.proc.returncode == 4
    last = triton_serve.output().strip().splitlines()[-1]
    assert last.startswith("Error: Triton stopped serving: health request failed"), last
    # Every process serve started is gone (the tensorrt_llm stub was once left running, orphaned, for an hour),
    # and so are the stubs' shared-memory regions.
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    assert not list(Path("/dev/shm").glob(f"nimb{triton_serve.proc.pid}s*"))


class _Alive:
    """What supervise() asks of a server: it is running."""

    proc = None

    @staticmethod
    def running() -> bool:
        return True


def _supervise(probe_error, steps, rounds=6):
    """supervise() with a probe that always fails with probe_error while the step counter follows `steps`."""
    import itertools
    import threading

    from nim_build.serving.server import supervise

    stop, calls = threading.Event(), itertools.count(1)
    counter = iter(steps)

    def probe():
        if next(calls) >= rounds:
            stop.set()
        raise probe_error

    return supervise(_Alive(), probe, interval_s=0.001, stop_event=stop, progress=lambda: next(counter))


def test_a_busy_engine_is_never_taken_for_a_dead_one():
    """Issue 12, item 6: under load the health request queues behind generation and times out; while the
    engine's step counter moves on, that is no failure, however long it lasts."""
    from nim_build.errors import ResponseTimeout

    assert _supervise(ResponseTimeout("no response within 30 s"), steps=range(100)) is None


def test_a_full_queue_is_an_answer_not_a_failure():
    """A probe refused for a full queue (tensorrt_llm's max_queue_size, or Triton's own queue with the same bound)
    met a live server: one at capacity is never restarted, even while its step counter stands still."""
    from nim_build.errors import QUEUE_FULL, TRITON_QUEUE_FULL, InferenceError

    for words in (f"{QUEUE_FULL} (max_queue_size 4): retry later", TRITON_QUEUE_FULL):
        assert _supervise(InferenceError(f"in ensemble 'ensemble', {words}"), steps=[7.0] * 100) is None


def test_a_stuck_engine_or_an_error_is_a_failure():
    from nim_build.errors import InferenceError, ResponseTimeout

    stuck = _supervise(ResponseTimeout("no response within 30 s"), steps=[7.0] * 100)
    assert stuck.startswith("health request failed 3 times in a row: no response")
    broken = _supervise(InferenceError("Stub process is not healthy"), steps=range(100))  # progress, but an error
    assert "Stub process is not healthy" in broken


def test_engine_stats_read_both_backends_metric_lines():
    """serve's supervision and drain and the OpenAI API's gauges read the engine's figures through one parser: the
    reference runtime's gauges, and TensorRT-LLM's lines as tensorrtllm_backend's README shows them."""
    from nim_build.serving.server import engine_stats

    reference = "\n".join(
        f'nim_build_engine{{stat="{k}"}} {v}'
        for k, v in {"steps": 12, "active": 3, "waiting": 1, "free_blocks": 30, "total_blocks": 40}.items()
    )
    assert engine_stats(reference) == {"steps": 12, "running": 3, "waiting": 1, "cache": 0.25}
    trtllm = """
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 2
nv_trt_llm_general_metrics{general_type="iteration_counter",model="tensorrt_llm",version="1"} 77
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 100
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 25
"""
    assert engine_stats(trtllm) == {"steps": 77, "running": 2, "waiting": 1, "cache": 0.25}
    assert engine_stats("nv_inference_count 3") == {}


def test_a_stop_request_is_answered_while_a_probe_waits():
    """Under load the health probe queues behind generation for up to its 30 s timeout; SIGTERM (stop_event) must
    not wait for it: the soak's SIGTERM used to sit 30 s behind one."""
    import threading
    import time

    from nim_build.serving.server import supervise

    stop, released = threading.Event(), threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    try:
        assert supervise(_Alive(), lambda: released.wait(30), interval_s=0.001, stop_event=stop) is None
        assert time.monotonic() - t0 < 2
    finally:
        released.set()  # the abandoned probe thread ends too
