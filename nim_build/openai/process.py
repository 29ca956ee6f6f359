"""The OpenAI API as a process beside Triton: `nim_build serve` starts it once Triton is ready, supervises both
(one exits: both stop, non-zero) and stops it before Triton, so its open streams end before the engine goes.

A process of its own, not a thread of serve: the API's event loop never shares a GIL with serve's supervision.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import TextIO

from nim_build.errors import ServerSetupError, ServingError


class OpenAIFrontend:
    def __init__(
        self,
        repo,
        *,
        host: str,
        port: int,
        grpc_url: str,
        triton_metrics_url: str | None = None,
        served_model_name: str | None = None,
        health_interval_s: float = 15.0,
        echo: TextIO | None = None,
    ):
        self.repo, self.host, self.port = repo, host, port
        self.args = ["--grpc-url", grpc_url, "--health-interval", str(health_interval_s)]
        if triton_metrics_url:
            self.args += ["--triton-metrics-url", triton_metrics_url]
        if served_model_name:
            self.args += ["--served-model-name", served_model_name]
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def check_port(self) -> None:
        from nim_build.serving.server import port_in_use

        if port_in_use(self.host, self.port):
            raise ServerSetupError(
                f"port {self.port} is already in use on {self.host or '0.0.0.0'}; "
                "stop what listens there, pick another with --openai-port, or --no-openai"
            )

    def start(self) -> OpenAIFrontend:
        self.check_port()
        from nim_build.serving.server import spawn

        cmd = [sys.executable, "-m", "nim_build.openai", str(self.repo), "--host", self.host, "--port", str(self.port)]
        self.proc, self._pump = spawn(cmd + self.args, self._lines, self.echo, prefix="[openai] ")
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> str | None:
        """Why the process is no longer running, or None while it runs."""
        return None if self.running() else self.exit_reason()

    def exit_reason(self) -> str:
        last = next((ln for ln in reversed(self._lines) if ln.strip()), "no output")
        return f"the OpenAI API process exited with code {self.proc.returncode}: {' '.join(last.split())[:500]}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float, stop_event: threading.Event | None = None) -> bool:
        """Until /v1/health/ready answers 200 (True) or stop_event is set (False)."""
        from nim_build.serving.server import wait_child

        state = wait_child(self.ready, self.proc, self._pump, timeout_s, stop_event)
        if state == "exited":
            raise ServingError(self.exit_reason())
        if state == "timeout":
            raise ServingError(f"the OpenAI API was not ready after {timeout_s:.0f} s (at {self.url})")
        return state == "ready"

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (uvicorn stops accepting and closes its streams), then SIGKILL past timeout_s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._pump is not None:
            self._pump.join(timeout=5)
        return self.proc.returncode
