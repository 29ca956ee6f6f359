"""`nim_build download`: pre-fetch what builds of a hub model read, for a cluster without internet."""

from __future__ import annotations

import click


@click.command("download")
@click.argument("model")
@click.option(
    "--cache",
    required=True,
    type=click.Path(file_okay=False),
    help="huggingface_hub cache directory to download into (what HF_HUB_CACHE points at later).",
)
@click.option("--allow-pickle", is_flag=True, help="Fetch pytorch_model*.bin weights too (see `nim_build engine`).")
def command(model, cache, allow_pickle):
    """Download MODEL (a hub id `org/name[@revision]`) into the huggingface_hub cache CACHE: config, safetensors
    weights + index, tokenizer and generation config, nothing else; then check every file a build reads is there.

    \b
    On a cluster without internet:
      nim_build download mistralai/Mistral-Nemo-Instruct-2407 --cache ./hf     # on a connected machine
      # copy ./hf onto the cluster's volume, then there:
      HF_HUB_CACHE=/models/hf HF_HUB_OFFLINE=1 nim_build store mistralai/Mistral-Nemo-Instruct-2407 --out ...
    Offline (HF_HUB_OFFLINE=1), it checks the cache instead and names any file missing.
    """
    from pathlib import Path

    from nim_build.builder.default_model import is_default_model
    from nim_build.builder.resolve import resolve_model
    from nim_build.errors import UserError

    if is_default_model(model) or Path(model).expanduser().exists():
        raise UserError(f"{model} is not a hub id: download fetches org/name[@revision] from the Hugging Face Hub")
    resolved = resolve_model(model, allow_pickle=allow_pickle, cache_dir=Path(cache).resolve())
    click.echo(resolved.local_dir)
    click.echo(
        f"next: HF_HUB_CACHE={Path(cache).resolve()} HF_HUB_OFFLINE=1 nim_build store {model} --out STORE", err=True
    )
