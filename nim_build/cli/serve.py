"""`nim_build serve`: run tritonserver on a repository, wait until ready, supervise it with real requests."""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path

import click

from nim_build.cli._options import compute_dtype_option, profile_goal_option, profile_option
from nim_build.deploy.profiles import PROFILE_ENV
from nim_build.errors import UserError
from nim_build.openai import DEFAULT_OPENAI_PORT
from nim_build.serving.http_guard import DEFAULT_MAX_BODY, TRITON_SAFE_MAX_BODY


@click.command("serve")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@profile_option
@profile_goal_option
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option(
    "--openai-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_OPENAI_PORT,
    show_default=True,
    help="Port of the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, NIM's /v1/health/*, "
    "/v1/metrics, /v1/metadata).",
)
@click.option("--openai/--no-openai", default=True, show_default=True, help="Serve the OpenAI-compatible API.")
@click.option(
    "--served-model-name",
    help="The model name of the OpenAI API (the `model` clients send) [default: the engine's name, its manifest's].",
)
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
    help="Seconds serve waits, when asked to stop, for the requests in flight to finish before it stops Triton "
    "(which then waits as long again for what is left).",
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
@click.option(
    "--mpi-hosts",
    envvar="NIM_BUILD_MPI_HOSTS",
    help="Multi-node: the group's pods as mpirun's HOST:SLOTS list (slots = GPUs, adding up to the engine's world "
    "size), or `lws` (the LeaderWorkerSet group this pod leads); the ranks start through each pod's "
    "`nim_build mpi-worker` [env NIM_BUILD_MPI_HOSTS].",
)
@click.option("--quiet", is_flag=True, help="Do not echo Triton's log to stderr.")
def command(repo, profile, profile_goal, **flags):
    """Serve REPO (from `nim_build repo`) with Triton, and the OpenAI-compatible API beside it; exits non-zero
    when a model stops answering or either server exits.

    REPO may be a model store (`nim_build store`): the profile for this node is chosen (docs/PROFILES.md; every
    profile not chosen is logged with the reason), built there first when the store lists it build-on-node, and
    served from a repository in a temporary directory."""
    with _repository(repo, profile, profile_goal) as path:
        _serve(path, **flags)


@contextlib.contextmanager
def _repository(path: str, profile: str | None, goal: str):
    """The repository to serve: path itself, or one written for the profile chosen from the store at path."""
    from nim_build.deploy.store import choose, is_store

    if not is_store(path):
        if profile:
            raise UserError(f"--profile / {PROFILE_ENV} applies to a model store, and {path} is a repository")
        yield path
        return
    from nim_build.serving.repo import generate_repo

    _, engine = choose(path, goal=goal, override=profile)
    with tempfile.TemporaryDirectory(prefix="nim_build-repo-") as tmp:
        yield generate_repo(engine, Path(tmp) / "repo")


def _serve(
    repo,
    host,
    http_port,
    grpc_port,
    metrics_port,
    openai_port,
    openai,
    served_model_name,
    startup_timeout,
    health_interval,
    exit_timeout,
    threads,
    compute_dtype,
    http_max_body,
    mpi_hosts,
    quiet,
):
    from nim_build.errors import ServingError
    from nim_build.openai.process import OpenAIFrontend
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
        mpi_hosts=mpi_hosts,
    )
    metrics = f"http://{server.client_host}:{metrics_port}/metrics"
    frontend = None
    if openai and _is_llm_repo(server.repo):  # the ready line says whether it runs
        frontend = OpenAIFrontend(
            server.repo,
            host=host,
            port=openai_port,
            grpc_url=server.grpc_url,
            triton_metrics_url=metrics,
            served_model_name=served_model_name,
            health_interval_s=health_interval,
            echo=None if quiet else sys.stderr,
        )
    stop = threading.Event()
    signals = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    reason = None
    try:
        if frontend is not None:
            frontend.check_port()  # before the engine loads, which may take minutes
        server.start()
        # a SIGTERM while the engine loads stops it at once
        if server.wait_ready(startup_timeout, stop) and (frontend is None or _start(frontend, startup_timeout, stop)):
            probe = health_probe(server.grpc_url, server.repo)
            probe()
            models = ", ".join(sorted(p.parent.name for p in server.repo.glob("*/config.pbtxt")))
            openai_url = f"  OpenAI {frontend.url}/v1" if frontend else ""
            click.echo(
                f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.client_host}:"
                f"{metrics_port}/metrics{openai_url}  (models: {models})",
                err=True,
            )
            chat = _chat_flag(server.repo)
            click.echo(f"try: nim_build infer --url {server.grpc_url} --prompt 'Hello'{chat} --stream", err=True)
            if frontend:
                click.echo(
                    f"try: curl {frontend.url}/v1/chat/completions -H 'Content-Type: application/json' "
                    """-d '{"messages": [{"role": "user", "content": "Hello"}]}'""",
                    err=True,
                )
            reason = supervise(
                server,
                probe,
                interval_s=health_interval,
                stop_event=stop,
                progress=lambda: engine_steps(metrics),
                companion_exited=frontend.exited if frontend else None,
            )
    finally:
        if frontend is not None:  # first: its streams end before the engine goes
            frontend.stop()
        # asked to stop: what runs finishes first (Triton stops its endpoints at SIGTERM: requests in flight would hang)
        if reason is None and server.running():
            if not server.drain(exit_timeout):  # new requests are refused from now on
                click.echo(
                    f"note: requests still running after --exit-timeout {exit_timeout} s; stopping anyway", err=True
                )
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


def _start(frontend, timeout_s: float, stop: threading.Event) -> bool:
    frontend.start()
    return frontend.wait_ready(timeout_s, stop)


def _is_llm_repo(repo) -> bool:
    from nim_build.serving.tokenizer import REPO_TOKENIZER_DIR

    return (repo / "tensorrt_llm" / "config.pbtxt").is_file() and (repo / REPO_TOKENIZER_DIR).is_dir()


def _chat_flag(repo) -> str:
    """' --chat' when the served model has a chat template (an instruct model answers chats, not raw text)."""
    from nim_build.jsonfile import read_object
    from nim_build.serving.tokenizer import META_FILE, REPO_TOKENIZER_DIR

    meta = repo / REPO_TOKENIZER_DIR / META_FILE
    return " --chat" if meta.is_file() and read_object(meta).get("chat_template") else ""
