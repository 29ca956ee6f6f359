"""`nim_build profiles`: the profiles that make sense for a model, and which of them a node can run."""

from __future__ import annotations

import json

import click

from nim_build import options
from nim_build.cli._options import gpus_option, profile_goal_option
from nim_build.deploy.profiles import PROFILE_FIELDS


@click.command("profiles")
@click.argument("model")
@gpus_option
@profile_goal_option
@options.click_options(portable_only=True, exclude=PROFILE_FIELDS)
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON on stdout.")
def command(model, gpus, profile_goal, as_json, **flags):
    """List the profiles of MODEL (a hub id, a local checkpoint, `default`, or a model store from `nim_build
    store`) for a node's GPUs and for CPU: runnable or not, and why; the one `nim_build serve` would choose.

    \b
    Only config.json is read (a hub model: only that file is fetched). A profile is a backend, a precision,
    a tp and a target; its id is a hash of every build option, these flags included (`nim_build store` with
    the same flags builds the same ids). Examples:
      nim_build profiles mistralai/Mistral-Nemo-Instruct-2407 --gpus "H100-SXM x8"
      nim_build profiles ./nemo --gpus "L40S x2" --max-seq-len 32768 --json
      nim_build profiles /models/store          # the store's profiles, on this node
    """
    from nim_build.builder.resolve import model_config
    from nim_build.builder.spec import parse_config
    from nim_build.deploy import profiles as P
    from nim_build.deploy import store as S

    node = P.detect_node(gpus)
    if S.is_store(model):
        store = S.load_store(model)
        spec, max_seq_len = store.spec(), store.max_seq_len()
        planned = [P.evaluate(e.profile, spec, node, max_seq_len) for e in store.entries]
    else:
        opts = options.from_mapping({"model": model, **flags})
        spec = parse_config(model_config(model))
        max_seq_len = options.resolve_max_seq_len(opts.max_seq_len, spec.max_position_embeddings)
        planned = P.plan(spec, node, max_seq_len, P.shared_build(opts))
    chosen = P.select(planned, profile_goal)[0] if any(p.runnable for p in planned) else None
    if as_json:
        out = {
            "node": node.describe(),
            "max_seq_len": max_seq_len,
            "goal": profile_goal,
            "chosen": chosen.name if chosen else None,
            "profiles": [p.to_dict() for p in planned],
        }
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"node {node.describe()}, max_seq_len {max_seq_len}, goal {profile_goal}")
    width = max(len(p.profile.name) for p in planned)
    for runnable in (True, False):
        rows = [p for p in planned if p.runnable == runnable]
        if rows:
            click.echo("runnable:" if runnable else "not runnable here:")
        for p in rows:
            mark = "  <- chosen" if p.profile == chosen else ""
            what = f"{p.weights_per_gpu / P.GIB:5.1f} GiB weights/{'GPU' if p.profile.gpu != 'cpu' else 'process'}"
            click.echo(
                f"  {p.profile.name:{width}}  {p.profile.id}  " + (what + mark if runnable else "; ".join(p.reasons))
            )
