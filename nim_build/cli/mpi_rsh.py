"""`nim_build mpi-rsh HOST COMMAND...`: the remote-shell agent mpirun calls to reach a `nim_build mpi-worker`."""

from __future__ import annotations

import sys

import click


@click.command(
    "mpi-rsh", hidden=True, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("host")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def command(host, argv):
    """Run COMMAND on HOST's `nim_build mpi-worker` and exit with its status (mpirun's plm_rsh_agent; set by
    `nim_build serve --mpi-hosts`)."""
    from nim_build.serving.mpi_launch import run_agent

    sys.exit(run_agent(host, list(argv)))
