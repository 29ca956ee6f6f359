"""`nim_build serve` supervision: Triton keeps reporting ready after a python stub died, serve notices with a
real request and exits non-zero with the reason (so an orchestrator restarts it).

This runs last among the server tests: it kills a model of the session's server on purpose.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import psutil


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
