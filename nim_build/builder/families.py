"""Per-family knowledge as data: HF tensor names of the llama/mistral decoder and the transformers classes
that compute it. Adding a family means adding one entry here (and its TensorRT-LLM names if they differ)."""

from __future__ import annotations

from dataclasses import dataclass

from nim_build.errors import ConfigError


@dataclass(frozen=True)
class Family:
    decoder_type: str  # modelopt/TensorRT-LLM decoder type
    hf_module: str  # transformers module holding the decoder layer and rotary embedding
    layer_class: str
    rotary_class: str
    norm_class: str
    config_class: str
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer_prefix: str = "model.layers.{i}."

    def layer(self, i: int, suffix: str) -> str:
        return self.layer_prefix.format(i=i) + suffix

    def head_source(self, tie_word_embeddings: bool, names) -> str:
        """The HF tensor the output projection comes from: the embedding when tied or when no lm_head is stored."""
        return self.embed if tie_word_embeddings or self.lm_head not in names else self.lm_head


LLAMA = Family(
    "llama",
    "transformers.models.llama.modeling_llama",
    "LlamaDecoderLayer",
    "LlamaRotaryEmbedding",
    "LlamaRMSNorm",
    "LlamaConfig",
)
MISTRAL = Family(
    "llama",
    "transformers.models.mistral.modeling_mistral",
    "MistralDecoderLayer",
    "MistralRotaryEmbedding",
    "MistralRMSNorm",
    "MistralConfig",
)
FAMILIES = {"LlamaForCausalLM": LLAMA, "MistralForCausalLM": MISTRAL}

# HF suffixes inside a decoder layer.
Q, K, V, O = (f"self_attn.{n}_proj.weight" for n in "qkvo")
GATE, UP, DOWN = "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"
INPUT_NORM, POST_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"


def family_for(architecture: str) -> Family:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ConfigError(f"architecture {architecture!r} is not supported; supported: {', '.join(FAMILIES)}") from None
