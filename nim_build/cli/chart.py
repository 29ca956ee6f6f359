"""`nim_build chart`: Helm values for serving a built engine, sized from its manifest."""

from __future__ import annotations

import click

from nim_build.cli._options import gpus_option, profile_goal_option


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
@gpus_option
@profile_goal_option
@click.option(
    "--store-path",
    help="A model store's directory on the cache volume, relative to its mount [default: stores/<STORE's name>].",
)
def command(engine_dir, out, force, gpus, profile_goal, store_path):
    """Write Helm values for the nim-llm chart from ENGINE_DIR's manifest: GPU count = tp, the GPU products
    of the engine's architecture, memory, /dev/shm, cache size, startup-probe budget and the model.

    ENGINE_DIR may be a model store (`nim_build store`): the values are then sized from the profile that would
    be chosen on the --gpus node, and point the chart at the store (model.store, chosen on the node at start).

    \b
    Examples:
      nim_build chart engines/nemo --out values.yaml
      nim_build chart /models/nemo-store --gpus "H100-SXM x8" --out values.yaml
      helm install nemo helm/nim-llm -f values.yaml
    """
    from nim_build.deploy.chart import write_values
    from nim_build.deploy.profiles import detect_node
    from nim_build.deploy.store import is_store

    node = detect_node(gpus) if is_store(engine_dir) else None
    path, notes = write_values(engine_dir, out, force=force, node=node, goal=profile_goal, store_path=store_path)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {path}")
    click.echo(f"next: helm install RELEASE helm/nim-llm -f {path}")
