"""`nim_build serve` supervision: Triton keeps reporting ready after a python stub died, serve notices with a
real request and exits non-zero with the reason (so an orchestrator restarts it).

This runs last among the server tests: it kills a model of the session's server on purpose.
"""

from __future__ import annotations

import time
import urllib.request

import psutil


def test_dead_stub_makes_serve_exit_nonzero(triton_serve):
    stubs = [p for p in psutil.Process(triton_serve.proc.pid).children(recursive=True)
             if "triton_python_backend_stub" in p.name() and any("preprocessing" in a for a in p.cmdline())]
    assert stubs, "no preprocessing stub found"
    stubs[0].kill()
    time.sleep(1)
    # Triton itself still says ready...
    assert urllib.request.urlopen(f"http://{triton_serve.http_url}/v2/health/ready", timeout=5).status == 200
    # ...but serve's health request fails and it exits with a user-facing error.
    triton_serve.proc.wait(timeout=90)
    assert triton_serve.proc.returncode == 2
    last = triton_serve.output().strip().splitlines()[-1]
    assert last.startswith("Error: Triton stopped serving: health request failed"), last
