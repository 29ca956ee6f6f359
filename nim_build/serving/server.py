"""Run a real tritonserver on a model repository: find the binary, prepare backends and environment, start,
wait for readiness, supervise with real requests, stop.

Binary: $TRITONSERVER, else /opt/tritonserver/bin/tritonserver (NVIDIA's serving image), else the Triton 2.51
bundled in the `nvidia-pytriton` wheel (CPU; python backend only). For the bundled one the python backend is
assembled in a temporary backend directory (libtriton_python.so, triton_python_backend_utils.py and the stub of
the running Python), with LD_LIBRARY_PATH = this Python's LIBDIR + nvidia_pytriton.libs and this environment's
bin first on PATH, so model.py files import this environment's packages (docs/TRITON.md).

With a TensorRT-LLM engine of world size > 1 the server runs under mpirun, one process per rank: rank 0 serves
every model, the other ranks load only `tensorrt_llm`; each has its own python-backend shared-memory prefix.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from nim_build import COMPUTE_DTYPE_ENV, limits
from nim_build.errors import ResponseTimeout, ServerSetupError, ServingError, is_queue_full
from nim_build.serving.http_guard import DEFAULT_MAX_BODY, HttpGuard

NGC_BINARY = "/opt/tritonserver/bin/tritonserver"
SHM_DIR = "/dev/shm"
_SERVERS = itertools.count()
NGC_BACKENDS = "/opt/tritonserver/backends"
# The header Triton's model-repository API requires (HTTP and gRPC); its value is a secret of each start, which only
# serve knows: clients cannot load or unload models, serve unloads them to drain (TritonServer.drain).
CONTROL_HEADER = "nim-build-control"


def find_tritonserver() -> Path:
    """Where the tritonserver binary is ($TRITONSERVER, NVIDIA's image, nvidia-pytriton's bundle)."""
    env = os.environ.get("TRITONSERVER")
    if env:
        if not os.access(env, os.X_OK):
            raise ServerSetupError(f"TRITONSERVER={env} is not an executable file; point it at a tritonserver binary")
        return Path(env)
    if os.access(NGC_BINARY, os.X_OK):
        return Path(NGC_BINARY)
    bundled = _pytriton_root()
    if bundled is not None and os.access(bundled / "bin" / "tritonserver", os.X_OK):
        return bundled / "bin" / "tritonserver"
    raise ServerSetupError(
        "no tritonserver found: set TRITONSERVER, use nvcr.io/nvidia/tritonserver:*-trtllm-python-py3, "
        "or `pip install nvidia-pytriton==0.7.0` for the CPU server"
    )


def _pytriton_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports nothing listens on now (bound together, then released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A loopback port nothing listens on (for Triton's private HTTP port)."""
    return free_ports(1)[0]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError:
            return True
    return False


def _check_mpi_hosts(hosts: str, world_size: int) -> str:
    """`HOST:SLOTS,...` (mpirun's --host), its slots adding up to the engine's world size; `lws`: the
    LeaderWorkerSet group this pod leads (mpi_launch.lws_hosts)."""
    if hosts == "lws":
        from nim_build.serving.mpi_launch import lws_hosts

        hosts = lws_hosts(world_size)
    slots = 0
    for item in hosts.split(","):
        host, _, n = item.partition(":")
        if not host or not n.isdigit() or int(n) < 1:
            raise ServerSetupError(
                f"--mpi-hosts {hosts!r}: expected HOST:SLOTS[,HOST:SLOTS...], e.g. leader:4,worker-1:4"
            )
        slots += int(n)
    if slots != world_size:
        raise ServerSetupError(f"--mpi-hosts {hosts!r} has {slots} slots; the engine has world size {world_size}")
    return hosts


def model_dependencies(repo: Path) -> dict[str, set[str]]:
    """Each model of a repository -> the models of the repository it calls: an ensemble's steps, and the models
    named by `*_model_name` parameters (the BLS, postprocessing's `stop` requests)."""
    configs = {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}
    named = re.compile(r'model_name:\s*"([^"]+)"|key:\s*"\w*_model_name"\s*value\s*\{\s*string_value:\s*"([^"]+)"')
    return {name: {a or b for a, b in named.findall(text)} & configs.keys() - {name} for name, text in configs.items()}


def engine_world_size(repo: Path) -> int:
    """World size of a TensorRT-LLM engine served by the repository's tensorrt_llm model (1 for python)."""
    from nim_build.serving.repo import read_config

    cfg_path = repo / "tensorrt_llm" / "config.pbtxt"
    if not cfg_path.is_file():
        return 1
    cfg = read_config(cfg_path)
    if cfg.backend != "tensorrtllm":
        return 1
    engine_cfg = Path(cfg.parameters["gpt_model_path"].string_value) / "config.json"
    if not engine_cfg.is_file():
        raise ServerSetupError(f"{engine_cfg} not found: the repository's gpt_model_path does not hold an engine")
    mapping = json.loads(engine_cfg.read_text()).get("pretrained_config", {}).get("mapping", {})
    return int(mapping.get("world_size", 1))


class TritonServer:
    """One tritonserver (or one per rank under mpirun) on a model repository."""

    def __init__(
        self,
        repo: str | os.PathLike,
        *,
        host: str = "0.0.0.0",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        binary: str | os.PathLike | None = None,
        exit_timeout_s: int = 30,
        echo: TextIO | None = None,
        world_size: int | None = None,
        extra_args: tuple[str, ...] = (),
        threads: int | None = None,
        compute_dtype: str | None = None,
        http_max_body: int | None = DEFAULT_MAX_BODY,
        mpi_hosts: str | None = None,
    ):
        self.repo = Path(repo).resolve()
        if not (self.repo.is_dir() and any(self.repo.glob("*/config.pbtxt"))):
            raise ServerSetupError(
                f"{repo} is not a Triton model repository (no */config.pbtxt); "
                f"generate one with `nim_build repo ENGINE_DIR --out {repo}`"
            )
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.binary = Path(binary) if binary else None
        self.exit_timeout_s = exit_timeout_s
        self.echo = echo
        self.world_size = world_size if world_size is not None else engine_world_size(self.repo)
        self.mpi_hosts = _check_mpi_hosts(mpi_hosts, self.world_size) if mpi_hosts else None
        self.extra_args = tuple(extra_args)
        self.threads = threads  # torch threads of each engine process (default: the CPUs it may use)
        self.compute_dtype = compute_dtype  # the reference engine's (default: auto)
        # Triton's own HTTP port: private, behind the body-size guard on http_port (None: Triton on http_port)
        self.http_max_body = http_max_body
        self._guard: HttpGuard | None = None
        self._triton_http_port = http_port
        self.proc: subprocess.Popen | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=400)
        self._pump: threading.Thread | None = None
        self._workdir: str | None = None
        self.shm_prefix = f"nimb{os.getpid()}s{next(_SERVERS)}"  # python-backend regions in /dev/shm: ours only
        self._control_key = secrets.token_urlsafe(24)  # CONTROL_HEADER's value; never logged
        self.killed = False  # the server overstayed stop()'s timeout and was killed

    # -- addresses -----------------------------------------------------------------------------------------
    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    # -- command and environment ---------------------------------------------------------------------------
    def _backend_dir(self, binary: Path) -> Path:
        """The backend directory: the image's own, or a python backend assembled from nvidia-pytriton."""
        sibling = binary.parent.parent / "backends"
        bundled = _pytriton_root()
        if bundled is None or binary.parent.parent.resolve() != bundled.resolve():
            return sibling if sibling.is_dir() else Path(NGC_BACKENDS)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = bundled / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerSetupError(f"nvidia-pytriton has no python backend stub for Python {version}")
        out = Path(self._workdir) / "backends" / "python"
        out.mkdir(parents=True, exist_ok=True)
        for src in (
            bundled / "backends" / "python" / "libtriton_python.so",
            bundled / "backends" / "python" / "triton_python_backend_utils.py",
            stub,
        ):
            shutil.copy2(src, out / src.name)
        return out.parent

    def env(self, binary: Path) -> dict[str, str]:
        env = dict(os.environ)
        libs = [sysconfig.get_config_var("LIBDIR") or ""]
        bundled = _pytriton_root()
        if bundled is not None:
            libs.append(str(bundled.parent.parent / "nvidia_pytriton.libs"))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.threads:
            env[limits.THREADS_ENV] = str(self.threads)
        if self.compute_dtype:
            env[COMPUTE_DTYPE_ENV] = self.compute_dtype
        if self.mpi_hosts:
            from nim_build.serving.mpi_launch import agent_env

            env.update(agent_env())
        return env

    def drain(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Unload every model, callers before the models they call: True when all are unloaded, False when timeout_s
        passed first.

        Triton refuses new requests to a model being unloaded at once, with an error, and unloads it when the
        requests it holds have finished. So what runs finishes, and nothing is in flight when Triton then gets
        SIGTERM: Triton 2.51 stops its endpoints first at SIGTERM, and a request in flight then never completes.
        docs/TRITON.md says why refusing new requests in `tensorrt_llm` instead did not do it."""
        try:
            return self._unload_all(time.monotonic() + timeout_s, poll_s)
        except (OSError, ValueError):  # Triton ended, or does not answer: nothing left to wait for here
            return False

    def _unload_all(self, deadline: float, poll_s: float) -> bool:
        calls = model_dependencies(self.repo)
        loaded = set(calls)
        while loaded:
            called = set().union(*(calls[m] for m in loaded))
            batch = (loaded - called) or loaded  # a cycle: all at once
            for name in sorted(batch):
                self._repository(f"models/{name}/unload", {}, max(deadline - time.monotonic(), 1.0))
            while True:
                states = {m["name"]: m.get("state") for m in self._repository("index", {}, 10.0)}
                if not any(states.get(m) in ("READY", "LOADING", "UNLOADING") for m in batch):
                    break
                if time.monotonic() >= deadline:
                    return False
                time.sleep(poll_s)
            loaded -= batch
        return True

    def _repository(self, path: str, body: dict, timeout_s: float):
        """POST to Triton's model-repository API (restricted to CONTROL_HEADER), on its own HTTP port."""
        host = "127.0.0.1" if self.http_max_body else self.client_host
        req = urllib.request.Request(
            f"http://{host}:{self._triton_http_port}/v2/repository/{path}",
            data=json.dumps(body).encode(),
            headers={CONTROL_HEADER: self._control_key, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            text = r.read()
        return json.loads(text) if text else None

    def rank_args(self, binary: Path, backends: Path, rank: int) -> list[str]:
        args = [
            str(binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--http-address={'127.0.0.1' if self.http_max_body else self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self._triton_http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--disable-auto-complete-config",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}r{rank}_",
        ]
        if rank > 0:
            args += ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
        else:  # every model, and the repository API for serve alone (drain)
            restricted = f"model-repository:{CONTROL_HEADER}={self._control_key}"
            args += ["--model-control-mode=explicit", "--load-model=*"]
            args += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        return args + list(self.extra_args)

    def command(self, binary: Path, backends: Path) -> list[str]:
        if self.world_size <= 1:
            return self.rank_args(binary, backends, 0)
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise ServerSetupError(f"the engine has world size {self.world_size}: mpirun is needed and not on PATH")
        cmd = [mpirun, "--allow-run-as-root"]
        if self.mpi_hosts:  # ranks over the group's pods, launched through their mpi-worker (mpi_launch.py)
            cmd += ["--host", self.mpi_hosts, "-x", "LD_LIBRARY_PATH", "-x", "PATH"]
        for rank in range(self.world_size):
            cmd += ["-n", "1", *self.rank_args(binary, backends, rank), ":"]
        return cmd[:-1]

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> TritonServer:
        binary = self.binary or find_tritonserver()
        for flag, port in (
            ("--http-port", self.http_port),
            ("--grpc-port", self.grpc_port),
            ("--metrics-port", self.metrics_port),
        ):
            if port_in_use(self.host, port):
                raise ServerSetupError(
                    f"port {port} is already in use on {self.host or '0.0.0.0'}; "
                    f"stop what listens there or pick another with {flag}"
                )
        if self.http_max_body:
            self._triton_http_port = free_port()
        self._workdir = tempfile.mkdtemp(prefix="nim_build_triton_")
        backends = self._backend_dir(binary)
        self.proc, self._pump = spawn(self.command(binary, backends), self._lines, self.echo, env=self.env(binary))
        if self.http_max_body:
            self._guard = HttpGuard(
                self.host, self.http_port, f"127.0.0.1:{self._triton_http_port}", self.http_max_body
            )
            try:
                self._guard.start()
            except OSError as e:
                self.stop()
                raise ServerSetupError(f"cannot listen on {self.host}:{self.http_port}: {e.strerror or e}") from None
        return self

    def logs(self, n: int = 40) -> str:
        return "\n".join(list(self._lines)[-n:])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self._triton_http_port}/v2/health/ready"  # Triton itself
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 180.0, stop_event: threading.Event | None = None) -> bool:
        """Wait until Triton answers ready (True), or stop_event is set (False: asked to stop meanwhile)."""
        state = wait_child(self.ready, self.proc, self._pump, timeout_s, stop_event)
        if state == "exited":
            raise ServingError(
                f"Triton exited (code {self.proc.returncode}) before it was ready: {self.failure_reason()}"
            )
        if state != "timeout":
            return state == "ready"
        reason = self.failure_reason()
        self.stop()
        raise ServingError(
            f"Triton was not ready after {timeout_s:.0f} s (last log line: {reason}); "
            "see its log above, or raise --startup-timeout"
        )

    def failure_reason(self) -> str:
        """The most telling error line of the log, in one line."""
        # Without a GPU every start logs these errors: harmless.
        harmless = ("unable to create stream for ensemble", "CudaDriverHelper has not been initialized")
        lines = [ln for ln in self._lines if not any(h in ln for h in harmless)]
        for marker in (
            "failed to load",
            "failed to stop",
            "Internal: ",
            "Invalid argument",
            "Unavailable",
            "error:",
            "E1",
            "E0",
        ):
            for line in lines:
                if marker in line:
                    return " ".join(line.split())[:600]
        return " ".join(lines[-1].split())[:600] if lines else "no output"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop Triton and everything it started; returns Triton's exit code (negative: killed by that signal).

        SIGTERM to the server only (mpirun forwards it to the ranks): its python stubs, in its process group, must
        stay alive while it unloads them. Whatever way the server ended (here, by a crash, or killed when it
        overstays timeout_s), the rest of its process group is then terminated -> waited for -> killed, and the
        shared-memory regions its python stubs leave in /dev/shm are removed. `killed` says whether the server
        itself had to be killed."""
        if self.proc is None:
            return None
        timeout_s = timeout_s if timeout_s is not None else self.exit_timeout_s + 10
        started = _descendants(self.proc.pid)  # also what left the process group (mpirun's ranks may)
        if self.proc.poll() is None:
            _signal(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                _signal(-self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        _stop_group(self.proc.pid)
        _stop_processes(started)
        if self._guard is not None:  # after Triton: its last answers to open HTTP requests still pass
            self._guard.stop()
            self._guard = None
        for region in Path(SHM_DIR).glob(f"{self.shm_prefix}r*"):  # "r": not another server's s1 -> s10
            region.unlink(missing_ok=True)
        if self._pump is not None:
            self._pump.join(timeout=5)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return self.proc.returncode

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_child(
    ready: Callable[[], bool],
    proc: subprocess.Popen,
    pump: threading.Thread | None,
    timeout_s: float,
    stop_event: threading.Event | None = None,
) -> str:
    """Wait for a child started by spawn() to be ready: "ready", "stopped" (stop_event was set), "exited" (the child
    ended; its output is read to the end) or "timeout"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop_event is not None and stop_event.is_set():
            return "stopped"
        if proc.poll() is not None:
            if pump is not None:
                pump.join(timeout=5)
            return "exited"
        if ready():
            return "ready"
        time.sleep(0.25)
    return "timeout"


def spawn(
    cmd: list[str], lines: collections.deque, echo: TextIO | None, prefix: str = "", env: dict | None = None
) -> tuple[subprocess.Popen, threading.Thread]:
    """Start a child in a session of its own (its process group is ours to stop), its output read by a thread into
    `lines` and echoed (each line after `prefix`)."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
        errors="replace",
        bufsize=1,
    )

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if echo is not None:
                echo.write(prefix + line)
                echo.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return proc, thread


def _signal(pid: int, sig: int) -> bool:
    """os.kill (a negative pid: the process group); False when no such process is left."""
    try:
        if pid < 0:
            os.killpg(-pid, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a pid reused by another user's process: not ours
        return False


def _stop_group(pgid: int, grace_s: float = 5.0) -> None:
    """Terminate -> wait -> kill what is left of a process group (children reparented to us are reaped)."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while _signal(-pgid, sig):
        try:  # when we are PID 1 (a container) or a subreaper, orphaned stubs are our children: reap them
            while os.waitpid(-pgid, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                return  # only zombies that are not ours to reap are left
            sig, deadline = signal.SIGKILL, time.monotonic() + 2.0
        time.sleep(0.05)


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _stop_processes(procs: list, grace_s: float = 5.0) -> None:
    """Terminate -> wait -> kill the processes still running of those listed (psutil checks each is the same
    process, not a reused pid)."""
    import psutil

    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    alive = [p for p in procs if running(p)]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=2)


HEALTH_FAILURES_ALLOWED = 2  # failed health requests in a row before a server counts as not serving


def supervise(
    server: TritonServer,
    probe: Callable[[], None],
    interval_s: float = 10.0,
    stop_event: threading.Event | None = None,
    failures_allowed: int = HEALTH_FAILURES_ALLOWED,
    progress: Callable[[], float | None] | None = None,
    companion_exited: Callable[[], str | None] | None = None,
) -> str | None:
    """Block while the server lives and answers `probe`; return why it stopped serving (None when asked to stop).

    Triton keeps reporting ready after a python stub crashed, so health is a real request: `probe` raises
    when a model does not answer. A busy server is not a dead one: a probe that timed out (it queued behind the
    generation of others) while `progress` (the engine's step counter) moved on is no failure. Otherwise
    `failures_allowed` consecutive failures are tolerated. `companion_exited` (the OpenAI API process) is checked
    every half second and, like Triton's own exit, ends serving at once. The probe runs in a thread of its own, so a
    stop request is answered at once even while a probe waits behind a busy engine (up to its timeout).
    """
    stop_event = stop_event or threading.Event()
    failures = 0
    next_probe = time.monotonic() + interval_s
    while not stop_event.wait(min(0.5, interval_s)):
        if not server.running():
            return f"Triton exited with code {server.proc.returncode}: {server.failure_reason()}"
        why = companion_exited() if companion_exited is not None else None
        if why:
            return why
        if time.monotonic() < next_probe:
            continue
        before = _safe(progress)
        done, e = _run(probe, stop_event)
        if not done:
            return None
        if e is None or is_queue_full(str(e)):  # a refusal for a full queue: the server answered
            failures = 0
        else:  # any failure of the real request counts, but a timeout of a busy engine
            after = _safe(progress)
            if isinstance(e, ResponseTimeout) and before is not None and after is not None and after > before:
                failures = 0
            else:
                failures += 1
                if failures > failures_allowed:
                    return f"health request failed {failures} times in a row: {' '.join(str(e).split())[:500]}"
        next_probe = time.monotonic() + interval_s
    return None


def _run(fn: Callable[[], None], stop_event: threading.Event) -> tuple[bool, Exception | None]:
    """Call fn in a daemon thread: (True, the exception it raised or None), or (False, None) when stop_event was set
    first (fn is left to end on its own)."""
    box: list[Exception | None] = []

    def call() -> None:
        try:
            fn()
            box.append(None)
        except Exception as e:
            box.append(e)

    thread = threading.Thread(target=call, name="nim_build-health", daemon=True)
    thread.start()
    while thread.is_alive():
        if stop_event.wait(0.1):
            return False, None
    return True, box[0] if box else None


def _safe(read: Callable[[], float | None] | None) -> float | None:
    try:
        return read() if read is not None else None
    except Exception:
        return None


# The reference runtime's engine statistics (tensorrt_llm/model.py STATS_KEYS), and TensorRT-LLM's metric lines
# (tensorrtllm_backend README, "Triton Metrics") for the same figures: (metric, label, value).
_REFERENCE_STAT = re.compile(r'^nim_build_engine\{stat="(\w+)"\} ([0-9.e+-]+)$', re.M)
_TRTLLM_STATS = {
    "steps": ("nv_trt_llm_general_metrics", "general_type", "iteration_counter"),
    "running": ("nv_trt_llm_request_metrics", "request_type", "active"),
    "waiting": ("nv_trt_llm_request_metrics", "request_type", "waiting"),
    "used_blocks": ("nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "used"),
    "max_blocks": ("nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "max"),
}


def metrics_text(metrics_url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as r:
        return r.read().decode("utf-8", errors="replace")


def engine_stats(text: str) -> dict[str, float]:
    """The engine's figures in Triton's metrics, under one set of names for both backends: steps (the step
    counter), running and waiting (requests), cache (KV-cache use, 0 to 1). What a backend does not export is left
    out."""
    ref = {k: float(v) for k, v in _REFERENCE_STAT.findall(text)}
    if ref:
        names = (("steps", "steps"), ("running", "active"), ("waiting", "waiting"))
        out = {name: ref[key] for name, key in names if key in ref}
        total = ref.get("total_blocks", 0.0)
        out["cache"] = (total - ref.get("free_blocks", 0.0)) / total if total else 0.0
        return out
    found = {}
    for name, (metric, label, value) in _TRTLLM_STATS.items():
        m = re.search(rf'^{metric}\{{[^}}]*{label}="{value}"[^}}]*\}} ([0-9.e+-]+)$', text, re.M)
        if m:
            found[name] = float(m.group(1))
    out = {k: found[k] for k in ("steps", "running", "waiting") if k in found}
    if found.get("max_blocks"):
        out["cache"] = found.get("used_blocks", 0.0) / found["max_blocks"]
    return out


def engine_steps(metrics_url: str) -> float | None:
    """The engine's step counter from Triton's metrics (None when the backend exports none)."""
    return engine_stats(metrics_text(metrics_url)).get("steps")
