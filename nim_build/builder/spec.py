"""ModelSpec: the facts of an HF config.json that the builder needs, in every producer's spelling
(docs/FORMATS.md, section 1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from nim_build.builder.families import FAMILIES
from nim_build.errors import CheckpointError, ConfigError
from nim_build.formats import DTYPE_SPELLINGS, DTYPES, ROPE_TYPES
from nim_build.jsonfile import read_object

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
            f"{model_dir} has no config.json; point MODEL at a Hugging Face model directory or a hub id"
        )
    return read_object(path)


def _int(cfg: dict, key: str, source: str, default: int | None = None, minimum: int = 1) -> int:
    """A whole-number field of config.json (required when default is None), at least `minimum`."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise ConfigError(f"{source}: missing required field {key!r}")
        return default
    if type(value) is not int or value < minimum:
        raise ConfigError(f"{source}: {key} is {value!r}; expected a whole number >= {minimum}")
    return value


def _number(value, key: str, source: str) -> float:
    """A positive number field of config.json."""
    if type(value) not in (int, float) or not value > 0 or value == float("inf"):
        raise ConfigError(f"{source}: {key} is {value!r}; expected a positive number")
    return float(value)


def _token_id(cfg: dict, key: str, source: str):
    """A special token id: null, a whole number or a list of them (several end ids)."""
    value = cfg.get(key)
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(type(i) is int and i >= 0 for i in ids):
        raise ConfigError(f"{source}: {key} is {value!r}; expected a token id or a list of them")
    return value


def _rope(cfg: dict, source: str) -> tuple[float, dict | None]:
    """RoPE base and scaling from `rope_theta` (top level) or transformers 5's `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters is {params!r}; expected an object")
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        theta = 10000.0  # the HF default for both families when the config names none
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling is {scaling!r}; expected an object or null")
        scaling = dict(scaling)
        rtype = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        if rtype not in ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope scaling type {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        scaling = None if rtype == "default" else {"type": rtype, **scaling}
        if scaling is not None:
            if "factor" not in scaling:
                raise ConfigError(f"{source}: rope scaling of type {rtype!r} needs a 'factor'")
            _number(scaling["factor"], "rope_scaling.factor", source)
    return _number(theta, "rope_theta", source), scaling


def parse_config(cfg: dict, source: str = "config.json") -> ModelSpec:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    arch = next((a for a in archs if isinstance(a, str) and a in SUPPORTED_ARCHITECTURES), None)
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
    hidden = _int(cfg, "hidden_size", source)
    heads = _int(cfg, "num_attention_heads", source)
    kv_heads = _int(cfg, "num_key_value_heads", source, default=heads)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if cfg.get("head_dim") is None and hidden % heads:
        raise ConfigError(
            f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} and no head_dim is given"
        )
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"{source}: tie_word_embeddings is {tie!r}; expected true or false")
    theta, scaling = _rope(cfg, source)
    return ModelSpec(
        architecture=arch,
        vocab_size=_int(cfg, "vocab_size", source),
        hidden_size=hidden,
        num_hidden_layers=_int(cfg, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_size=_int(cfg, "head_dim", source, default=hidden // heads),
        intermediate_size=_int(cfg, "intermediate_size", source),
        max_position_embeddings=_int(cfg, "max_position_embeddings", source, default=4096, minimum=2),
        rotary_base=theta,
        rotary_scaling=scaling,
        norm_epsilon=_number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
        tie_word_embeddings=tie,
        dtype=dtype,
        bos_token_id=_token_id(cfg, "bos_token_id", source),
        eos_token_id=_token_id(cfg, "eos_token_id", source),
        pad_token_id=_token_id(cfg, "pad_token_id", source),
    )
