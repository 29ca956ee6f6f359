"""`nim_build engine`: HF checkpoint -> FP8 TensorRT-LLM checkpoint (+ engine on a GPU) in one directory."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
import yaml

from nim_build.errors import UserError

YAML_KEYS = {f.name for f in dataclasses.fields(__import__("nim_build.builder.pipeline", fromlist=["BuildOptions"]).BuildOptions)} - {"argv"}


def _load_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read --config {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must be a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - YAML_KEYS)
    if unknown:
        raise UserError(f"--config {path}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(YAML_KEYS))}")
    return data


def _gate(value: str | None):
    if value is None:
        return None
    try:
        top1, ppl = (float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter("expected MIN_TOP1,MAX_PPL_INCREASE, e.g. 0.95,0.03") from None
    return top1, ppl


@click.command("engine")
@click.argument("model", required=False)
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Output directory [default: engines/<model name>].")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML file with the same keys as these flags (e.g. `quant: fp8`, `tp: 2`); flags win.")
@click.option("--quant", type=click.Choice(["fp8", "fp8-pc-pt", "bf16", "fp16"]), default="fp8", show_default=True,
              help="fp8: per-tensor FP8 weights and activations from calibration (modelopt-exact). "
                   "fp8-pc-pt: per-channel weights, per-token activations, no calibration. bf16/fp16: no quantization.")
@click.option("--kv-cache", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
              help="fp8: FP8 KV cache with calibrated scales (halves KV memory); auto: the model dtype.")
@click.option("--tp", type=click.Choice(["1", "2", "4", "8"]), default="1", show_default=True,
              help="Tensor-parallel size: GPUs per replica.")
@click.option("--backend", type=click.Choice(["auto", "trtllm", "reference"]), default="auto", show_default=True,
              help="trtllm: build a TensorRT-LLM 1.2 engine (GPU, compute capability >= 8.9 for FP8). reference: the "
                   "checkpoint served by nim_build's PyTorch runtime (CPU or GPU). auto: trtllm when it can run here.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-seq-len", type=click.IntRange(min=2), help="Prompt + output tokens [default: min(model's, 8192)].")
@click.option("--max-num-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Tokens per in-flight batching step (prefill chunks + decodes).")
@click.option("--calib-data", type=click.Path(exists=True, dir_okay=False),
              help="Calibration text, one sample per line [default: a built-in multilingual set].")
@click.option("--calib-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--calib-seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False),
              help="Evaluation text for the accuracy gate, one per line [default: built-in].")
@click.option("--accuracy-gate", "gate", metavar="MIN_TOP1,MAX_PPL_INCREASE",
              help="Gate thresholds: top-1 agreement with the HF model and perplexity increase [default: 0.95,0.03; "
                   "0.80,0.15 for the embedded 135M default model, which no per-tensor FP8 checkpoint gets closer].")
@click.option("--no-accuracy-gate", is_flag=True, help="Skip comparing the quantized checkpoint with the HF model.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model*.bin weights (pickle can run code).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Parallel engine builds.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.pass_context
def command(ctx, model, config_file, gate, no_accuracy_gate, as_json, **flags):
    """Build an engine directory from MODEL: a local HF checkpoint, a hub id `org/name[@revision]`, or `default`
    (SmolLM2-135M-Instruct, bundled, offline).

    \b
    Examples:
      nim_build engine default --out engines/smollm2 --backend reference
      nim_build engine mistralai/Mistral-Nemo-Instruct-2407 --quant fp8 --kv-cache fp8 --tp 2 --max-seq-len 32768
      nim_build engine ./my-llama --config build.yaml --json

    Writes OUT/checkpoint (TensorRT-LLM checkpoint), OUT/engine (trtllm backend), OUT/tokenizer and, last,
    OUT/manifest.json. Exit codes: 0 ok, 2 bad input, 3 accuracy gate failed, 1 internal error.
    """
    from nim_build.builder.pipeline import BuildOptions, build

    values = _load_yaml(config_file) if config_file else {}
    for key, value in flags.items():  # flags given on the command line win over the YAML file
        if key not in values or ctx.get_parameter_source(key).name != "DEFAULT":
            values[key] = value
    if model is not None:
        values["model"] = model
    if "model" not in values:
        raise UserError("missing MODEL: pass a directory, a hub id, or `default` (or `model:` in --config)")
    values["tp"] = int(values["tp"])
    if gate is not None:
        values["min_top1"], values["max_ppl_increase"] = _gate(gate)
    if no_accuracy_gate:
        values["accuracy_gate"] = False
    opts = BuildOptions(**values, argv=(ctx.obj or {}).get("argv", sys.argv[1:]))
    summary = build(opts, progress=not as_json)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(_human(summary))


def _human(s: dict) -> str:
    lines = [f"built {s['name']} -> {s['out']}",
             f"  backend {s['backend']}, quant {s['quant']}, tp {s['tp']}, max_seq_len {s['max_seq_len']}",
             f"  size {s['size_bytes'] / 2**20:.1f} MiB, time {s['time_s']:.1f} s, "
             f"peak memory {s['peak_rss_bytes'] / 2**30:.2f} GiB"]
    acc = s.get("accuracy")
    if acc:
        lines.append(f"  accuracy vs HF: top-1 agreement {acc['top1_agreement']:.4f}, perplexity "
                     f"{acc['ppl_reference']:.3f} -> {acc['ppl_quantized']:.3f} ({acc['ppl_increase']:+.2%}); gate "
                     f">= {acc['gate']['min_top1']}, <= {acc['gate']['max_ppl_increase']:+.0%}: passed")
    lines.append(f"next: nim_build repo {s['out']} --out triton_repo_out/{s['name']}")
    return "\n".join(lines)
