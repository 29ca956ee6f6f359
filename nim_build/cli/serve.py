"""`nim_build serve`: run tritonserver on a repository, wait until ready, supervise it with real requests."""

from __future__ import annotations

import signal
import sys
import threading

import click

from nim_build.cli._options import compute_dtype_option
from nim_build.serving.http_guard import DEFAULT_MAX_BODY, TRITON_SAFE_MAX_BODY


@click.command("serve")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option(
    "--startup-timeout",
    type=click.FloatRange(min=1),
    default=600,
    show_default=True,
    help="Seconds to wait for every model to load.",
)
@click.option(
    "--health-interval",
    type=click.FloatRange(min=0.5),
    default=15,
    show_default=True,
    help="Seconds between health requests (a real one-token generation).",
)
@click.option(
    "--exit-timeout",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="Seconds Triton waits for open requests when stopping.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="CPU threads of the reference engine [default: the CPUs this process may use (affinity, cgroup quota)]; "
    "give each server its share when several share a machine.",
)
@compute_dtype_option
@click.option(
    "--http-max-body",
    type=click.IntRange(1, TRITON_SAFE_MAX_BODY),
    default=DEFAULT_MAX_BODY,
    show_default=True,
    help="Largest HTTP request body in bytes; larger ones get 413 before they reach Triton (whose 2.51 "
    "HTTP frontend crashes from about 4 MB).",
)
@click.option("--quiet", is_flag=True, help="Do not echo Triton's log to stderr.")
def command(
    repo,
    host,
    http_port,
    grpc_port,
    metrics_port,
    startup_timeout,
    health_interval,
    exit_timeout,
    threads,
    compute_dtype,
    http_max_body,
    quiet,
):
    """Serve REPO (from `nim_build repo`) with Triton; exits non-zero when a model stops answering."""
    from nim_build.errors import ServingError
    from nim_build.serving.client import health_probe
    from nim_build.serving.server import TritonServer, engine_steps, supervise

    server = TritonServer(
        repo,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        exit_timeout_s=exit_timeout,
        echo=None if quiet else sys.stderr,
        threads=threads,
        compute_dtype=compute_dtype,
        http_max_body=http_max_body,
    )
    stop = threading.Event()
    signals = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    reason = None
    try:
        server.start()
        if server.wait_ready(startup_timeout, stop):  # a SIGTERM while the engine loads stops it at once
            probe = health_probe(server.grpc_url, server.repo)
            probe()
            models = ", ".join(sorted(p.parent.name for p in server.repo.glob("*/config.pbtxt")))
            click.echo(
                f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.client_host}:"
                f"{metrics_port}/metrics  (models: {models})",
                err=True,
            )
            chat = _chat_flag(server.repo)
            click.echo(f"try: nim_build infer --url {server.grpc_url} --prompt 'Hello'{chat} --stream", err=True)
            metrics = f"http://{server.client_host}:{metrics_port}/metrics"
            reason = supervise(
                server, probe, interval_s=health_interval, stop_event=stop, progress=lambda: engine_steps(metrics)
            )
    finally:
        code = server.stop()
        for sig, handler in signals.items():
            signal.signal(sig, handler)
    if reason is not None:
        raise ServingError(f"Triton stopped serving: {reason}")
    if server.killed:
        raise ServingError(f"Triton did not stop within --exit-timeout {exit_timeout} s and was killed")
    if code != 0:
        raise ServingError(f"Triton exited with code {code} when asked to stop: {server.failure_reason()}")
    click.echo(f"stopped (Triton exit code {code})", err=True)


def _chat_flag(repo) -> str:
    """' --chat' when the served model has a chat template (an instruct model answers chats, not raw text)."""
    from nim_build.jsonfile import read_object
    from nim_build.serving.tokenizer import META_FILE, REPO_TOKENIZER_DIR

    meta = repo / REPO_TOKENIZER_DIR / META_FILE
    return " --chat" if meta.is_file() and read_object(meta).get("chat_template") else ""
