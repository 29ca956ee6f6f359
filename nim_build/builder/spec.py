"""ModelSpec: the facts of an HF config.json that the builder needs, in every producer's spelling
(docs/FORMATS.md, section 1)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nim_build.builder.families import FAMILIES
from nim_build.errors import CheckpointError, ConfigError
from nim_build.formats import DTYPE_SPELLINGS, DTYPES, ROPE_TYPES

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
SUPPORTED_ACTS = ("silu", "swish")


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int
    rotary_base: float
    rotary_scaling: dict | None
    norm_epsilon: float
    tie_word_embeddings: bool
    dtype: str
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_size

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(model_dir: str | Path) -> dict:
    """config.json of a model directory, as its producer wrote it."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} has no config.json; point MODEL at a Hugging Face model directory or hub id"
        )
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download the model") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download the model")
    return cfg


def _need(cfg: dict, key: str, source: str):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{source}: missing required field {key!r}")
    return cfg[key]


def _rope(cfg: dict, source: str) -> tuple[float, dict | None]:
    """RoPE base and scaling from `rope_theta` (top level) or transformers 5's `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        theta = 10000.0  # the HF default for both families when the config names none
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = dict(scaling)
        rtype = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        if rtype not in ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope scaling type {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        scaling = None if rtype == "default" else {"type": rtype, **scaling}
        if scaling is not None and "factor" not in scaling:
            raise ConfigError(f"{source}: rope scaling of type {rtype!r} needs a 'factor'")
    return float(theta), scaling


def parse_config(cfg: dict, source: str = "config.json") -> ModelSpec:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(
            f"{source}: architecture {archs or cfg.get('model_type')!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTS:
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported; supported: silu")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported (llama/mistral without biases only)")
    dtype_raw = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    dtype = DTYPE_SPELLINGS.get(str(dtype_raw).replace("torch.", ""))
    if dtype is None:
        raise ConfigError(f"{source}: dtype {dtype_raw!r} is not supported; supported: {', '.join(DTYPES)}")
    hidden = int(_need(cfg, "hidden_size", source))
    heads = int(_need(cfg, "num_attention_heads", source))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_size = cfg.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    theta, scaling = _rope(cfg, source)
    return ModelSpec(
        architecture=arch,
        vocab_size=int(_need(cfg, "vocab_size", source)),
        hidden_size=hidden,
        num_hidden_layers=int(_need(cfg, "num_hidden_layers", source)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_size=int(head_size),
        intermediate_size=int(_need(cfg, "intermediate_size", source)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        rotary_base=theta,
        rotary_scaling=scaling,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=dtype,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )
