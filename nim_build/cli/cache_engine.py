"""`nim_build cache-engine`: the engine for this node from the model cache, built there first when missing."""

from __future__ import annotations

import click


@click.command("cache-engine")
@click.argument("model")
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False), envvar="NIM_CACHE_DIR",
              help="Model cache directory (shared by the replicas) [env NIM_CACHE_DIR].")
@click.option("--revision", default="main", show_default=True,
              help="Branch, tag or commit of a hub MODEL; resolved to a commit for the cache key.")
@click.option("--quant", type=click.Choice(["fp8", "fp8-pc-pt", "bf16", "fp16"]), default="fp8", show_default=True)
@click.option("--tp", type=click.Choice(["1", "2", "4", "8"]), default="1", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "trtllm", "reference"]), default="auto", show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-seq-len", type=click.IntRange(min=2), default=8192, show_default=True)
def command(model, cache_dir, revision, quant, tp, backend, max_batch_size, max_seq_len):
    """Print the directory of MODEL's engine for this node's GPU architecture and TensorRT-LLM version,
    building it into the cache first when the cache holds none (`nim_build engine` with these flags).

    \b
    The cache key covers the model (hub id + resolved commit, or a local directory's fingerprint), the flags,
    the GPU compute capability and the TensorRT-LLM version. Replicas starting together wait on a lock; a
    build runs in a private temporary directory renamed into place when complete. The Helm chart's init
    container runs:
      engine_dir="$(nim_build cache-engine MODEL --cache-dir /opt/nim/cache --tp 2)"
      nim_build repo "$engine_dir" --out /tmp/nim/repo
    """
    from nim_build.deploy.cache import EngineRequest, ensure_engine

    req = EngineRequest(model=model, revision=revision, quant=quant, tp=int(tp), backend=backend,
                        max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    click.echo(ensure_engine(cache_dir, req))
