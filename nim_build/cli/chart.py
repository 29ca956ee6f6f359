"""`nim_build chart`: Helm values for serving a built engine, sized from its manifest."""

from __future__ import annotations

import click


@click.command("chart")
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option(
    "--out",
    "-o",
    default="values.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Values file to write.",
)
@click.option("--force", is_flag=True, help="Replace an existing values file.")
def command(engine_dir, out, force):
    """Write Helm values for the nim-llm chart from ENGINE_DIR's manifest: GPU count = tp, the GPU products
    of the engine's architecture, memory, /dev/shm, cache size, startup-probe budget and the model.

    \b
    Example:
      nim_build chart engines/nemo --out values.yaml
      helm install nemo helm/nim-llm -f values.yaml
    """
    from nim_build.deploy.chart import write_values

    path, notes = write_values(engine_dir, out, force=force)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {path}")
    click.echo(f"next: helm install RELEASE helm/nim-llm -f {path}")
