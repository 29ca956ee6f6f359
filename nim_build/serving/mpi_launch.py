"""Launching MPI ranks on the other pods of a multi-node group without sshd.

mpirun starts its daemon on every other host through a remote-shell agent (OpenMPI's plm_rsh_agent, PRRTE's
plm_ssh_agent), called as `AGENT HOST COMMAND...`. The serving image has no sshd, and running one as a non-root
user needs keys, host keys and a writable /etc; so the worker pods of a group run `nim_build mpi-worker`, which
runs the commands the agent `nim_build mpi-rsh` sends, and nothing else. Both ends share a token (a Kubernetes
Secret the chart creates); a connection without it is closed unanswered.

Protocol, one TCP connection per command: the agent sends one JSON line {"token", "command"}; the worker runs
`/bin/sh -c command` in a new session and sends frames (1 byte kind, 4 bytes big-endian length, payload): "o"
stdout, "e" stderr, "x" the exit status (4 bytes, signed). When the connection drops (mpirun ended the agent,
the leader died), the worker kills the command's process group: no rank outlives its job.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from nim_build.errors import UserError

MPI_TOKEN_ENV = "NIM_BUILD_MPI_TOKEN"
MPI_PORT_ENV = "NIM_BUILD_MPI_PORT"
DEFAULT_MPI_PORT = 29400
CONNECT_TIMEOUT_ENV = "NIM_BUILD_MPI_CONNECT_TIMEOUT"  # seconds the agent waits for a worker to listen
MAX_REQUEST = 1 << 20  # the longest command line a worker reads
_FRAME = struct.Struct(">cI")


def token() -> str:
    value = os.environ.get(MPI_TOKEN_ENV, "")
    if len(value) < 16:
        raise UserError(f"{MPI_TOKEN_ENV} must hold the group's shared token (16+ characters; the chart sets it)")
    return value


def port() -> int:
    return int(os.environ.get(MPI_PORT_ENV) or DEFAULT_MPI_PORT)


def agent_command() -> str:
    """The remote-shell agent mpirun calls (its arguments follow: HOST COMMAND...)."""
    return f"{shlex.quote(sys.executable)} -m nim_build mpi-rsh"


def agent_env() -> dict[str, str]:
    """Environment that makes mpirun launch through the agent: OpenMPI 4 (HPC-X in NVIDIA's images) and 5 (PRRTE)."""
    return {"OMPI_MCA_plm_rsh_agent": agent_command(), "PRTE_MCA_plm_ssh_agent": agent_command()}


def lws_hosts(world_size: int) -> str:
    """mpirun's --host list for the LeaderWorkerSet group this pod leads: the leader (LWS_LEADER_ADDRESS, e.g.
    rel-0.rel.ns) and its workers (rel-0-1.rel.ns, ...: LWS names worker pods after their leader), each with
    world_size / LWS_GROUP_SIZE slots."""
    leader, size = os.environ.get("LWS_LEADER_ADDRESS"), os.environ.get("LWS_GROUP_SIZE")
    if not leader or not (size or "").isdigit():
        raise UserError(
            "--mpi-hosts lws needs LWS_LEADER_ADDRESS and LWS_GROUP_SIZE (set by LeaderWorkerSet in its pods)"
        )
    size = int(size)
    if world_size % size:
        raise UserError(f"the engine's world size {world_size} is not a multiple of the group's {size} pods")
    name, _, domain = leader.partition(".")
    slots = world_size // size
    workers = [f"{name}-{i}.{domain}" if domain else f"{name}-{i}" for i in range(1, size)]
    return ",".join(f"{h}:{slots}" for h in [leader, *workers])


def _send(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    sock.sendall(_FRAME.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# -- the worker ----------------------------------------------------------------------------------------------------


def _serve_one(conn: socket.socket, secret: str) -> None:
    with conn:
        line = b""
        while not line.endswith(b"\n") and len(line) < MAX_REQUEST:
            chunk = conn.recv(65536)
            if not chunk:
                return
            line += chunk
        try:
            request = json.loads(line)
            ok = hmac.compare_digest(str(request["token"]).encode(), secret.encode())
            command = str(request["command"])
        except (ValueError, KeyError, TypeError):
            return
        if not ok:
            print("[nim_build mpi-worker] refused a connection with a wrong token", file=sys.stderr, flush=True)
            return
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: killed as a whole
        )
        lock = threading.Lock()

        def relay(stream, kind: bytes) -> None:
            for chunk in iter(lambda: stream.read1(65536), b""):
                with lock:
                    try:
                        _send(conn, kind, chunk)
                    except OSError:
                        return

        def watch() -> None:  # the agent went away: so does the command
            try:
                while conn.recv(1):
                    pass
            except OSError:
                pass
            if proc.poll() is None:
                _kill_group(proc)

        relays = [
            threading.Thread(target=relay, args=(s, k), daemon=True)
            for s, k in ((proc.stdout, b"o"), (proc.stderr, b"e"))
        ]
        for t in relays:
            t.start()
        threading.Thread(target=watch, daemon=True).start()
        code = proc.wait()
        for t in relays:
            t.join()
        with lock:
            try:
                _send(conn, b"x", struct.pack(">i", code))
            except OSError:
                pass


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_worker(host: str = "0.0.0.0", listen_port: int | None = None, ready=None) -> None:
    """Run the commands agents send until SIGTERM. ready(port) is called once listening."""
    secret = token()
    server = socket.create_server((host, listen_port if listen_port is not None else port()), reuse_port=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.settimeout(0.5)
    print(f"[nim_build mpi-worker] listening on {host}:{server.getsockname()[1]}", file=sys.stderr, flush=True)
    if ready:
        ready(server.getsockname()[1])
    with server:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=_serve_one, args=(conn, secret), daemon=True).start()


# -- the agent -----------------------------------------------------------------------------------------------------


def run_agent(host: str, argv: list[str]) -> int:
    """Run argv (mpirun passes one shell command, possibly in several words) on host's worker; its exit status."""
    command = " ".join(argv)
    deadline = time.monotonic() + float(os.environ.get(CONNECT_TIMEOUT_ENV) or 600)
    while True:  # a worker pod may still be in its init container (loading the engine from the volume)
        try:
            sock = socket.create_connection((host, port()), timeout=30)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"cannot reach the mpi-worker on {host}:{port()} ({e.strerror or e}); is the worker pod up?"
                ) from None
            time.sleep(2)
    sock.settimeout(None)
    with sock:
        sock.sendall(json.dumps({"token": token(), "command": command}).encode() + b"\n")
        out = {b"o": sys.stdout.buffer, b"e": sys.stderr.buffer}
        while header := _recv_exact(sock, _FRAME.size):
            kind, length = _FRAME.unpack(header)
            payload = _recv_exact(sock, length) or b""
            if kind == b"x":
                code = struct.unpack(">i", payload)[0] if len(payload) == 4 else 255
                return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention
            out[kind].write(payload)
            out[kind].flush()
    raise UserError(f"the mpi-worker on {host} closed the connection without an exit status (a wrong token?)")
