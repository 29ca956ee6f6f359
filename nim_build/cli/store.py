"""`nim_build store`: build several profiles of one model into a model store."""

from __future__ import annotations

import json

import click

from nim_build import options
from nim_build.cli._options import gpus_option, profile_goal_option
from nim_build.deploy.profiles import PROFILE_FIELDS


@click.command("store")
@click.argument("model")
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False), help="Store directory (created, or added to)."
)
@click.option("--profile", "wanted", multiple=True, help="A profile to build (name or id; repeat for several).")
@click.option("--all-runnable", is_flag=True, help="Every profile the --gpus node can run.")
@gpus_option
@profile_goal_option
@options.click_options(portable_only=True, exclude=PROFILE_FIELDS)
@click.option("--json", "as_json", is_flag=True, help="Print the store's profiles as JSON on stdout.")
def command(model, out, wanted, all_runnable, gpus, profile_goal, as_json, **flags):
    """Build profiles of MODEL into the model store OUT: the profiles named with --profile, every one the node
    can run (--all-runnable), or else the one `nim_build serve` would choose there. The other flags mean what
    they mean for `nim_build engine` and hold for every profile of the store.

    \b
    OUT/model_manifest.yaml lists the profiles; OUT/profiles/<id>/ holds each engine directory, the tokenizer is
    stored once. A profile that needs a GPU this machine lacks (TensorRT-LLM engines build on the GPU they run
    on) is listed "build-on-node": `nim_build serve OUT` builds it there. Running again adds profiles; a build
    that dies leaves the store as it was. Examples:
      nim_build store default --out store --profile reference-cpu-fp8-tp1 --profile reference-cpu-bf16-tp1
      nim_build store mistralai/Mistral-Nemo-Instruct-2407 --out /models/nemo --gpus "H100-SXM x8" --all-runnable
      nim_build serve /models/nemo            # chooses the profile for the node it runs on
    """
    from nim_build.deploy import profiles as P
    from nim_build.deploy.store import BUILT, build_store
    from nim_build.errors import ConfigError

    if wanted and all_runnable:
        raise ConfigError("--profile and --all-runnable exclude each other; give one of them")
    opts = options.from_mapping({"model": model, **flags})
    store = build_store(model, out, opts, P.detect_node(gpus), list(wanted), all_runnable, profile_goal)
    if as_json:
        click.echo(json.dumps({"store": str(store.root), "profiles": [e.to_dict() for e in store.entries]}, indent=2))
        return
    for e in store.entries:
        click.echo(f"{e.status:13} {e.profile.name}  {e.profile.id}")
    click.echo(f"wrote {store.root}", err=True)
    if any(e.status == BUILT for e in store.entries):
        click.echo(f"next: nim_build serve {store.root}", err=True)
