"""`nim_build mpi-worker`: what the worker pods of a multi-node group run (nim_build.serving.mpi_launch)."""

from __future__ import annotations

import click

from nim_build.serving.mpi_launch import DEFAULT_MPI_PORT, MPI_PORT_ENV


@click.command("mpi-worker")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_MPI_PORT,
    show_default=True,
    envvar=MPI_PORT_ENV,
    help=f"Port the leader's mpirun connects to [env {MPI_PORT_ENV}].",
)
def command(host, port):
    """Run, until SIGTERM, the MPI daemons the group leader's `nim_build serve --mpi-hosts` starts on this pod
    (through its agent `nim_build mpi-rsh`); the ranks of the tensorrt_llm model run under them. Every
    connection must carry the group's token from NIM_BUILD_MPI_TOKEN; a dropped connection kills what it started."""
    from nim_build.serving.mpi_launch import run_worker

    run_worker(host, port)
