"""`nim_build engine`: HF checkpoint -> FP8 TensorRT-LLM checkpoint (+ engine on a GPU) in one directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from nim_build import options
from nim_build.errors import ConfigError, UserError


def load_config_file(path: str) -> dict:
    """The mapping of a --config YAML file (validated later, with the flags, by options.from_mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read --config {path}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must be a mapping of option names to values, e.g. `quant: fp8`")
    return data


@click.command("engine")
@click.argument("model", required=False)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML file with the same keys as these flags (e.g. `quant: fp8`, `tp: 2`); flags win.",
)
@options.click_options()
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.pass_context
def command(ctx, model, config_file, as_json, **flags):
    """Build an engine directory from MODEL: a local HF checkpoint, a hub id `org/name[@revision]`, or `default`
    (SmolLM2-135M-Instruct, bundled, offline).

    \b
    Examples:
      nim_build engine default --out engines/smollm2 --backend reference
      nim_build engine mistralai/Mistral-Nemo-Instruct-2407 --quant fp8 --kv-cache fp8 --tp 2 --max-seq-len 32768
      nim_build engine ./my-llama --config build.yaml --json

    Writes OUT/checkpoint (TensorRT-LLM checkpoint), OUT/engine (trtllm backend), OUT/tokenizer and, last,
    OUT/manifest.json. Exit codes: 0 ok, 2 bad input, 3 accuracy gate failed, 5 no space or no permission,
    1 internal error.
    """
    from nim_build.builder.pipeline import build

    values = load_config_file(config_file) if config_file else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values.update(options.given(ctx, flags))  # flags given on the command line win over the YAML file
    if model is not None:
        values["model"] = model
    if "model" not in values:
        raise UserError("missing MODEL: pass a directory, a hub id, or `default` (or `model:` in --config)")
    opts = options.from_mapping(values, f"--config {config_file}" if config_file else None)
    summary = build(opts, progress=not as_json, argv=(ctx.obj or {}).get("argv", sys.argv[1:]))
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(_human(summary))


def _human(s: dict) -> str:
    lines = [
        f"built {s['name']} -> {s['out']}",
        f"  backend {s['backend']}, quant {s['quant']}, tp {s['tp']}, max_seq_len {s['max_seq_len']}",
        f"  size {s['size_bytes'] / 2**20:.1f} MiB, time {s['time_s']:.1f} s, "
        f"peak memory {s['peak_rss_bytes'] / 2**30:.2f} GiB",
    ]
    acc = s.get("accuracy")
    if acc:
        lines.append(
            f"  accuracy vs HF: top-1 agreement {acc['top1_agreement']:.4f}, perplexity "
            f"{acc['ppl_reference']:.3f} -> {acc['ppl_quantized']:.3f} ({acc['ppl_increase']:+.2%}); gate "
            f">= {acc['gate']['min_top1']}, <= {acc['gate']['max_ppl_increase']:+.0%}: passed"
        )
    lines.append(f"next: nim_build repo {s['out']} --out triton_repo_out/{s['name']}")
    return "\n".join(lines)
