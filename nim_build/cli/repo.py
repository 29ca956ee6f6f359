"""`nim_build repo`: engine directory -> Triton model repository (the in-flight batching layout)."""

from __future__ import annotations

import click


@click.command("repo")
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Repository directory to write.")
@click.option("--model-name", default="ensemble", show_default=True, help="Name of the ensemble model.")
@click.option("--max-batch-size", type=click.IntRange(min=1), help="Triton max_batch_size [default: the engine's].")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of preprocessing and tensorrt_llm_bls (and postprocessing with --no-decoupled).")
@click.option("--decoupled/--no-decoupled", default=True, show_default=True,
              help="Decoupled transaction policy (needed for streaming).")
@click.option("--kv-cache-free-gpu-mem-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.9,
              show_default=True)
@click.option("--enable-kv-cache-reuse/--no-enable-kv-cache-reuse", default=True, show_default=True)
@click.option("--enable-chunked-context", is_flag=True)
@click.option("--batch-scheduler-policy", type=click.Choice(["guaranteed_no_evict", "max_utilization"]),
              default="guaranteed_no_evict", show_default=True)
@click.option("--postprocessing", type=click.Choice(["auto", "native", "python"]), default="auto", show_default=True,
              help="How postprocessing detokenizes: native (a C++ Triton backend, compiled on first use; a few us "
                   "per streamed token), python (the python backend: tens of us), auto (native when the "
                   "tokenizer and a C++ compiler allow).")
@click.option("--force", is_flag=True, help="Replace an existing repository.")
def command(engine_dir, out, force, **opts):
    """Write a Triton model repository (ensemble, preprocessing, tensorrt_llm, postprocessing, tensorrt_llm_bls)
    for ENGINE_DIR. Serve it with `nim_build serve OUT`."""
    from nim_build.serving.repo import RepoOptions, generate_repo

    path = generate_repo(engine_dir, out, RepoOptions(**opts), force=force)
    click.echo(f"wrote {path}")
    click.echo(f"next: nim_build serve {path}", err=True)
