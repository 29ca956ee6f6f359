"""Every option of an engine build, declared once.

`BuildOptions` is the declaration: each field's metadata (`_opt(...)`) carries its help, choices and range, its
type is the annotation and its default the field's. Everything else is derived from it, never written again:

- the click options of every command that builds (`nim_build engine`, `nim_build cache-engine`): `click_options`
- the YAML keys of `--config` and their validation (strings are not booleans, 1.5e3 is not an integer): `from_mapping`
- the child command line the engine cache runs: `to_argv`
- the engine cache's key: `cache_key_fields`
- the Helm chart's `engine` values (`to_chart` / `from_chart`) and, through `nim_build.deploy.chart_sync`, the
  chart's values.yaml block, values.schema.json section, README rows and init-container flag map.

Options are *portable* unless marked local: a portable option means the same on any machine, so it travels to
the engine cache and the chart; local ones name this machine's paths or this run's behaviour (out, calib_data...).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nim_build import TOKENS_PER_BLOCK
from nim_build.builder.default_model import FP8_GATE
from nim_build.errors import ConfigError

# --quant -> TensorRT-LLM quant_algo (None: not quantized)
QUANT_ALGOS = {"fp8": "FP8", "fp8-pc-pt": "FP8_PER_CHANNEL_PER_TOKEN", "bf16": None, "fp16": None, "fp32": None}
FP8_QUANTS = tuple(q for q in QUANT_ALGOS if q.startswith("fp8"))
UNQUANTIZED_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --quant -> checkpoint dtype
FP8_QUANT_ALGOS = tuple(QUANT_ALGOS[q] for q in FP8_QUANTS)
KV_CACHES = ("auto", "fp8")
TP_SIZES = (1, 2, 4, 8)
SERVED_BACKENDS = ("auto", "trtllm", "reference")  # what `nim_build repo`, the engine cache and the chart take
BACKENDS = (*SERVED_BACKENDS, "onnx")
DEFAULT_MAX_SEQ_LEN = 8192  # the max_seq_len default: min(the model's max_position_embeddings, this)
# The accuracy gate's defaults (min top-1 agreement, max relative perplexity increase): what FP8 (per-tensor) costs
# a 7B-12B model is well inside these; a wrong tensor mapping or scale is far outside them. The embedded 135M
# model has its own (default_model.FP8_GATE).
DEFAULT_GATE = (0.95, 0.03)


def _opt(
    help: str,
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    local: bool = False,
    key: bool = True,
    path: str | None = None,
    short: str | None = None,
    chart: str | None = None,
    argument: bool = False,
    chart_choices: tuple | None = None,
) -> dict:
    """Field metadata. local: not carried to the cache or the chart. key: part of the engine cache's key (a
    portable option that does not change the engine, like workers, is not). path: "file" / "dir" for paths.
    chart: the chart's key when it is not the camelCase of the name. argument: a positional argument.
    chart_choices: the choices the chart (and the engine cache) take, when fewer than the command line's."""
    return {
        "chart_choices": chart_choices or choices,
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "local": local,
        "key": key and not local,
        "path": path,
        "short": short,
        "chart": chart,
        "argument": argument,
    }


@dataclass(frozen=True)
class BuildOptions:
    """What `nim_build engine` builds. Constructing one validates every value (type, choices, range, combination)."""

    model: str = field(
        metadata=_opt(
            "A local HF checkpoint, a hub id org/name[@revision], or `default` (the embedded model).", argument=True
        )
    )
    out: str | None = field(
        default=None,
        metadata=_opt("Output directory [default: engines/<model name>].", local=True, path="dir", short="-o"),
    )
    name: str | None = field(
        default=None,
        metadata=_opt("Engine name recorded in the manifest [default: the output directory's name].", local=True),
    )
    quant: str = field(
        default="fp8",
        metadata=_opt(
            "fp8: per-tensor FP8 weights and activations from calibration (modelopt-exact). fp8-pc-pt: per-channel "
            "weights, per-token activations, no calibration. bf16/fp16/fp32: no quantization.",
            choices=tuple(QUANT_ALGOS),
        ),
    )
    kv_cache: str = field(
        default="auto",
        metadata=_opt(
            "fp8: FP8 KV cache with calibrated scales (halves KV memory; needs --quant fp8). auto: the model dtype.",
            choices=KV_CACHES,
        ),
    )
    tp: int = field(
        default=1,
        metadata=_opt("Tensor-parallel size: GPUs per replica.", choices=TP_SIZES, chart="tensorParallelSize"),
    )
    backend: str = field(
        default="auto",
        metadata=_opt(
            "trtllm: a TensorRT-LLM 1.2 engine (GPU; compute capability >= 8.9 for FP8). reference: the checkpoint "
            "served by nim_build's PyTorch runtime (CPU or GPU). auto: trtllm when it can build here. onnx "
            "(`nim_build engine` only, not served yet): the decoder as an ONNX graph, FP8 as Q/DQ, for TensorRT and "
            "onnxruntime-genai, checked with ONNX Runtime.",
            choices=BACKENDS,
            chart_choices=SERVED_BACKENDS,
        ),
    )
    max_batch_size: int = field(default=64, metadata=_opt("Most sequences in flight at once.", min=1, max=4096))
    max_seq_len: int | None = field(
        default=None,
        metadata=_opt(
            f"Prompt + output tokens [default: min(the model's max_position_embeddings, {DEFAULT_MAX_SEQ_LEN})].",
            min=2,
            max=1 << 20,
        ),
    )
    max_num_tokens: int = field(
        default=8192,
        metadata=_opt(
            "Tokens per in-flight batching step (prefill chunks + decodes); at least one KV-cache block.", min=1
        ),
    )
    calib_data: str | None = field(
        default=None,
        metadata=_opt(
            "Calibration text, one sample per line [default: a built-in multilingual set].", local=True, path="file"
        ),
    )
    calib_samples: int = field(default=32, metadata=_opt("Calibration samples (fp8).", min=1))
    calib_seq_len: int = field(default=256, metadata=_opt("Tokens per calibration sample (fp8).", min=2))
    eval_data: str | None = field(
        default=None,
        metadata=_opt(
            "Evaluation text for the accuracy gate, one per line [default: built-in].", local=True, path="file"
        ),
    )
    accuracy_gate: bool = field(
        default=True,
        metadata=_opt(
            "Compare the quantized checkpoint with the HF model's own forward pass; fail (exit 3) when it drifts."
        ),
    )
    min_top1: float | None = field(
        default=None,
        metadata=_opt(
            f"Gate: least top-1 agreement with the HF model [default: {DEFAULT_GATE[0]}; {FP8_GATE[0]} for the "
            "embedded 135M model].",
            min=0,
            max=1,
        ),
    )
    max_ppl_increase: float | None = field(
        default=None,
        metadata=_opt(
            f"Gate: largest relative perplexity increase [default: {DEFAULT_GATE[1]}; {FP8_GATE[1]} for the "
            "embedded 135M model].",
            min=0,
        ),
    )
    allow_pickle: bool = field(
        default=False, metadata=_opt("Accept pytorch_model*.bin weights (loading pickle can run code).")
    )
    workers: int = field(default=1, metadata=_opt("Parallel per-rank engine builds.", min=1, key=False))
    tensorrt: bool = field(
        default=False,
        metadata=_opt(
            "With --backend onnx: also build a TensorRT engine from the graph (onnx/model.plan) with the tensorrt "
            "package; needs an NVIDIA GPU, and the engine runs on that GPU model.",
            local=True,
        ),
    )
    force: bool = field(default=False, metadata=_opt("Replace an existing output directory.", local=True))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.kv_cache == "fp8" and self.quant != "fp8":
            raise ConfigError(
                "kv_cache fp8 needs quant fp8 (its scales come from the same calibration); "
                "pass --quant fp8 or --kv-cache auto"
            )
        if self.max_num_tokens < TOKENS_PER_BLOCK:
            raise ConfigError(
                f"max_num_tokens {self.max_num_tokens} is less than one KV-cache block "
                f"({TOKENS_PER_BLOCK} tokens): no prompt could be scheduled"
            )

    def replace(self, **changes) -> BuildOptions:
        return dataclasses.replace(self, **changes)

    def portable(self) -> dict[str, Any]:
        """The options that travel (to the engine cache, the chart, the manifest), by field name."""
        return {f.name: getattr(self, f.name) for f in fields(portable=True)}


def resolve_max_seq_len(max_seq_len: int | None, max_position_embeddings: int) -> int:
    """max_seq_len as a build takes it: the option, or min(the model's max_position_embeddings, the default)."""
    return max_seq_len or min(max_position_embeddings, DEFAULT_MAX_SEQ_LEN)


def default(name: str):
    """The declared default of an option."""
    return next(f.default for f in dataclasses.fields(BuildOptions) if f.name == name)


def fields(*, portable: bool | None = None, argument: bool = False) -> list[dataclasses.Field]:
    """The declared options (MODEL excluded unless argument=True), optionally only the portable or local ones."""
    out = []
    for f in dataclasses.fields(BuildOptions):
        m = f.metadata
        if m["argument"] and not argument:
            continue
        if portable is not None and not m["argument"] and m["local"] == portable:
            continue
        out.append(f)
    return out


_HINTS = typing.get_type_hints(BuildOptions)


def value_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(int | float | str | bool, whether None is allowed) of a field."""
    hint = _HINTS[f.name]
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        return args[0], True
    return hint, False


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _check(f: dataclasses.Field, value: Any) -> None:
    """Raise ConfigError unless value is valid for the option (exact types: YAML's "no" is not a boolean)."""
    kind, nullable = value_type(f)
    m = f.metadata
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{f.name}: a value is required ({_TYPE_NAMES[kind]})")
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok or (kind is float and not math.isfinite(value)):
        raise ConfigError(f"{f.name}: {value!r} is not {_TYPE_NAMES[kind]}")
    if m["choices"] is not None and value not in m["choices"]:
        raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(map(str, m['choices']))}")
    if m["min"] is not None and value < m["min"]:
        raise ConfigError(f"{f.name}: {value!r} is below the minimum {m['min']}")
    if m["max"] is not None and value > m["max"]:
        raise ConfigError(f"{f.name}: {value!r} is above the maximum {m['max']}")
    if kind is str and not value.strip():
        raise ConfigError(f"{f.name}: an empty string; " + ("give one" if m["argument"] else "leave the option out"))
    if m["path"] == "file" and not Path(value).is_file():  # checked by click for flags, here for YAML values
        raise ConfigError(f"{f.name}: {value} is not a file")


def from_mapping(data: Any, source: str | None = None) -> BuildOptions:
    """BuildOptions from a mapping with the options' names as keys (dashes or underscores), e.g. a YAML file;
    source (e.g. "--config build.yaml") prefixes the error messages."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}expected a mapping of option names to values, e.g. `quant: fp8`")
    names = {f.name for f in fields(argument=True)}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    if "model" not in values:
        raise ConfigError(f"{prefix}no model; pass MODEL or set `model:`")
    try:
        return BuildOptions(**values)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


# -- command line ------------------------------------------------------------------------------------------------


def flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def click_options(*, portable_only: bool = False, exclude: tuple[str, ...] = ()) -> Callable:
    """A decorator adding a click option for every declared option (only the portable ones with portable_only; none
    of `exclude`), with the declared defaults; `given` tells which ones the command line set."""
    import click

    def decorate(command):
        for f in reversed(fields(portable=True if portable_only else None)):
            if f.name in exclude:
                continue
            command = click.option(*_click_decls(f), **_click_kwargs(f, portable_only))(command)
        return command

    return decorate


def _click_decls(f: dataclasses.Field) -> list[str]:
    kind, _ = value_type(f)
    if kind is bool:
        return [f"{flag(f)}/--no-{flag(f)[2:]}", f.name]
    return [d for d in (flag(f), f.metadata["short"], f.name) if d]


def _click_kwargs(f: dataclasses.Field, chart: bool) -> dict:
    import click

    kind, _ = value_type(f)
    m = f.metadata
    kwargs = {"default": f.default, "help": m["help"], "show_default": f.default is not None}
    if m["choices"] is not None:
        kwargs["type"] = click.Choice(m["chart_choices"] if chart else m["choices"])
    elif m["path"] == "file":
        kwargs["type"] = click.Path(exists=True, dir_okay=False)
    elif m["path"] == "dir":
        kwargs["type"] = click.Path(file_okay=False)
    elif kind is int:
        kwargs["type"] = click.IntRange(min=m["min"], max=m["max"])
    elif kind is float:
        kwargs["type"] = click.FloatRange(min=m["min"], max=m["max"])
    elif kind is str:
        kwargs["type"] = click.STRING
    return kwargs


def given(ctx, flags: dict[str, Any]) -> dict[str, Any]:
    """The declared options among a command's flags that its command line set (not left at their defaults)."""
    names = {f.name for f in fields()}
    return {k: v for k, v in flags.items() if k in names and ctx.get_parameter_source(k).name != "DEFAULT"}


def to_argv(opts: BuildOptions) -> list[str]:
    """The portable options as `nim_build engine` / `nim_build cache-engine` flags (unset optional ones left out)."""
    argv: list[str] = []
    for f in fields(portable=True):
        value = getattr(opts, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag(f) if value else f"--no-{flag(f)[2:]}")
        else:
            argv += [flag(f), str(value)]
    return argv


def cache_key_fields(opts: BuildOptions) -> dict[str, Any]:
    """The options an engine depends on: what the engine cache's key covers."""
    return {f.name: getattr(opts, f.name) for f in fields(portable=True) if f.metadata["key"]}


# -- Helm chart --------------------------------------------------------------------------------------------------


def chart_key(f: dataclasses.Field) -> str:
    first, *rest = f.name.split("_")
    return f.metadata["chart"] or first + "".join(w.capitalize() for w in rest)


def to_chart(opts: BuildOptions) -> dict[str, Any]:
    """The chart's `engine` values for opts (every portable option, null where unset)."""
    return {chart_key(f): getattr(opts, f.name) for f in fields(portable=True)}


def from_chart(model: str, engine: dict[str, Any]) -> BuildOptions:
    """BuildOptions from the chart's model id and `engine` values (the inverse of to_chart)."""
    by_key = {chart_key(f): f for f in fields(portable=True)}
    unknown = sorted(set(engine) - set(by_key))
    if unknown:
        raise ConfigError(f"engine values: unknown keys {', '.join(unknown)}; valid: {', '.join(sorted(by_key))}")
    for key, value in engine.items():
        allowed = by_key[key].metadata["chart_choices"]
        if allowed is not None and value not in allowed:
            raise ConfigError(f"engine.{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    return BuildOptions(model=model, **{by_key[k].name: v for k, v in engine.items()})
