"""`nim_build repo`: engine directory -> Triton model repository (the in-flight batching layout)."""

from __future__ import annotations

import click

from nim_build import KV_CACHE_FREE_MEM_FRACTION
from nim_build.cli._options import profile_goal_option, profile_option
from nim_build.serving.repo import POSTPROCESSING, SCHEDULER_POLICIES


@click.command("repo")
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Repository directory to write.")
@click.option("--model-name", default="ensemble", show_default=True, help="Name of the ensemble model.")
@click.option("--max-batch-size", type=click.IntRange(min=1), help="Triton max_batch_size [default: the engine's].")
@click.option(
    "--instances",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Instances of preprocessing and tensorrt_llm_bls (and postprocessing with --no-decoupled).",
)
@click.option(
    "--decoupled/--no-decoupled",
    default=True,
    show_default=True,
    help="Decoupled transaction policy (needed for streaming).",
)
@click.option(
    "--kv-cache-free-gpu-mem-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=KV_CACHE_FREE_MEM_FRACTION,
    show_default=True,
    help="Share of the memory left after loading the weights that the KV cache takes "
    "(GPU memory for trtllm; for reference, the memory the container may still use).",
)
@click.option(
    "--enable-kv-cache-reuse/--no-enable-kv-cache-reuse",
    default=None,
    help="Reuse the KV cache of shared prompt prefixes [default: on for trtllm; reference has none].",
)
@click.option(
    "--enable-chunked-context",
    is_flag=True,
    help="Split prompts longer than a step's token budget over several steps (else a prompt is computed "
    "in one step and may not exceed the engine's max_num_tokens).",
)
@click.option(
    "--batch-scheduler-policy",
    type=click.Choice(SCHEDULER_POLICIES),
    default="guaranteed_no_evict",
    show_default=True,
    help="max_utilization (trtllm only) admits more requests and may pause some.",
)
@click.option(
    "--max-queue-size",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Requests tensorrt_llm keeps waiting for a place in the in-flight batch before it refuses new ones "
    "(UNAVAILABLE, OpenAI API 503); 0: no bound. Bounds the work a flood of requests leaves behind: "
    "without --decoupled, a client that leaves does not cancel its request (Triton 2.51).",
)
@click.option(
    "--exclude-input-in-output/--no-exclude-input-in-output",
    default=True,
    show_default=True,
    help="One-shot output_ids / text without the prompt (a request's exclude_input_in_output overrides it); "
    "True is what tensorrtllm_backend's docs fill in, the backend's own default is False.",
)
@click.option(
    "--postprocessing",
    type=click.Choice(POSTPROCESSING),
    default="auto",
    show_default=True,
    help="How postprocessing detokenizes: native (a C++ Triton backend, compiled on first use; a few us "
    "per streamed token), python (the python backend: tens of us), auto (native when the "
    "tokenizer and a C++ compiler allow).",
)
@click.option("--force", is_flag=True, help="Replace an existing repository.")
@profile_option
@profile_goal_option
def command(engine_dir, out, force, profile, profile_goal, **opts):
    """Write a Triton model repository (ensemble, preprocessing, tensorrt_llm, postprocessing, tensorrt_llm_bls)
    for ENGINE_DIR. Serve it with `nim_build serve OUT`.

    ENGINE_DIR may be a model store (`nim_build store`): the repository is then written for the profile chosen
    for this node (docs/PROFILES.md), built there first when the store lists it build-on-node."""
    from nim_build.deploy.store import choose, is_store
    from nim_build.errors import UserError
    from nim_build.serving.repo import RepoOptions, generate_repo

    if is_store(engine_dir):
        _, engine_dir = choose(engine_dir, goal=profile_goal, override=profile)
    elif profile:
        raise UserError(f"--profile applies to a model store, and {engine_dir} is an engine directory")

    path = generate_repo(engine_dir, out, RepoOptions(**opts), force=force)
    click.echo(f"wrote {path}")
    click.echo(f"next: nim_build serve {path}", err=True)
