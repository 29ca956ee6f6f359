"""`nim_build cache-engine`: the engine for this node from the model cache, built there first when missing."""

from __future__ import annotations

import click

from nim_build import options


@click.command("cache-engine")
@click.argument("model")
@click.option(
    "--cache-dir",
    required=True,
    type=click.Path(file_okay=False),
    envvar="NIM_CACHE_DIR",
    help="Model cache directory (shared by the replicas) [env NIM_CACHE_DIR].",
)
@click.option(
    "--revision",
    default="main",
    show_default=True,
    help="Branch, tag or commit of a hub MODEL; resolved to a commit for the cache key.",
)
@options.click_options(portable_only=True)
def command(model, cache_dir, revision, **flags):
    """Print the directory of MODEL's engine for this node's GPU architecture and TensorRT-LLM version,
    building it into the cache first when the cache holds none (`nim_build engine` with these flags, which
    mean what they mean there).

    \b
    The cache key covers the model (hub id + resolved commit, or the content of a local directory), the flags
    that change the engine, the converter's format version, the GPU compute capability and the TensorRT-LLM
    version. Replicas starting together wait on a lock; a build runs in a private temporary directory renamed
    into place when complete. The Helm chart's init container runs:
      engine_dir="$(nim_build cache-engine MODEL --cache-dir /opt/nim/cache --tp 2 ...)"
      nim_build repo "$engine_dir" --out /tmp/nim/repo
    """
    from nim_build.deploy.cache import ensure_engine

    opts = options.from_mapping({"model": model, **flags})
    click.echo(ensure_engine(cache_dir, opts, revision))
