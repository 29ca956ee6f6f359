"""ModelSpec parsing: every producer's config.json spelling (docs/FORMATS.md, section 1) and the errors for
unsupported ones."""

import pytest

from nim_build.builder.plan import make_plan
from nim_build.builder.spec import parse_config
from nim_build.errors import ConfigError

NEMO = {  # the real Mistral-Nemo-Instruct-2407 config.json (abridged to what we read)
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 5120,
    "head_dim": 128,
    "intermediate_size": 14336,
    "max_position_embeddings": 1024000,
    "num_attention_heads": 32,
    "num_hidden_layers": 40,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 131072,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_nemo_config():
    s = parse_config(NEMO)
    assert (s.head_size, s.q_size, s.kv_size) == (128, 4096, 1024)
    assert s.rotary_base == 1e6 and s.dtype == "bfloat16" and s.rotary_scaling is None


def test_transformers5_spelling_keeps_rope_theta():
    cfg = {k: v for k, v in NEMO.items() if k not in ("rope_theta", "torch_dtype")}
    cfg.update(dtype="bfloat16", rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    s = parse_config(cfg)
    assert s.rotary_base == 1e6 and s.rotary_scaling is None


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_llama3_rope_scaling_both_spellings(key):
    scaling = {
        key: "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = dict(NEMO, architectures=["LlamaForCausalLM"], rope_theta=500000.0, rope_scaling=scaling)
    s = parse_config(cfg)
    assert s.rotary_scaling == {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_transformers5_llama3_scaling_in_rope_parameters():
    cfg = {k: v for k, v in NEMO.items() if k != "rope_theta"}
    cfg["rope_parameters"] = {
        "rope_theta": 5e5,
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    s = parse_config(cfg)
    assert s.rotary_base == 5e5 and s.rotary_scaling["type"] == "llama3" and s.rotary_scaling["factor"] == 8.0


def test_missing_rope_theta_defaults_to_hf_default():
    cfg = {k: v for k, v in NEMO.items() if k != "rope_theta"}
    assert parse_config(cfg).rotary_base == 10000.0


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "supported: LlamaForCausalLM, MistralForCausalLM"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "supported: default, linear, llama3"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"torch_dtype": "int8"}, "dtype"),
        ({"num_key_value_heads": 5}, "not a multiple"),
    ],
)
def test_unsupported_values_name_what_is_supported(change, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(dict(NEMO, **change))


@pytest.mark.parametrize("tp, kv, repl, vocab", [(1, 8, 1, 131072), (2, 4, 1, 131072), (8, 1, 1, 131072)])
def test_plan_nemo(tp, kv, repl, vocab):
    p = make_plan(parse_config(NEMO), tp)
    assert (p.kv_heads_per_rank, p.kv_replication, p.padded_vocab_size) == (kv, repl, vocab)


def test_plan_replicates_kv_heads_and_pads_vocab():
    s = parse_config(dict(NEMO, num_key_value_heads=2, vocab_size=131071))
    p = make_plan(s, 8)
    assert (p.kv_heads_per_rank, p.kv_replication, p.padded_vocab_size) == (1, 4, 131072)


@pytest.mark.parametrize(
    "change, tp, match",
    [
        ({"num_attention_heads": 20, "num_key_value_heads": 4}, 8, "does not divide num_attention_heads"),
        ({"num_attention_heads": 24, "num_key_value_heads": 3}, 2, "does not divide num_key_value_heads"),
        ({"num_attention_heads": 12, "num_key_value_heads": 3}, 8, "does not divide num_attention_heads"),
        ({"num_attention_heads": 12, "num_key_value_heads": 3}, 4, "cannot replicate"),
        ({}, 3, "not supported"),
    ],
)
def test_plan_rejects_bad_tp(change, tp, match):
    with pytest.raises(ConfigError, match=match):
        make_plan(parse_config(dict(NEMO, **change)), tp)


def test_kv_cache_fp8_needs_fp8_weights():
    from nim_build.options import BuildOptions

    with pytest.raises(ConfigError, match="needs quant fp8"):
        BuildOptions(model="m", quant="bf16", kv_cache="fp8")
