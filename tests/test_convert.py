"""The converter against the HF weights themselves: dequantizing every tensor of the TensorRT-LLM checkpoint
(ranks merged back per docs/FORMATS.md, section 3) reproduces the HF tensor within FP8 rounding, for tp 1, 2 and 4."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import convert, make_tiny_model

from nim_build.builder.quantize import dequantize

# NeMo-like: head_dim 16 != hidden/heads 20; 2 KV heads (replicated at tp 4); odd vocab (lm_head padding).
SHAPE = dict(hidden_size=80, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=250)


def _unreplicate(w, rep, head_size):
    """Undo KV-head replication: keep every rep-th head."""
    return w.reshape(-1, head_size, w.shape[-1])[::rep].reshape(-1, w.shape[-1])


def merged_hf_weights(ckpt_dir, cfg):
    """Dequantize and merge every rank back into HF-named float32 tensors."""
    tp = cfg["mapping"]["tp_size"]
    ranks = [load_file(str(ckpt_dir / f"rank{r}.safetensors")) for r in range(tp)]
    hs, nh, nkv = cfg["head_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rep = max(tp // nkv, 1)

    def deq(rank, prefix):
        w = rank[prefix + ".weight"]
        if w.dtype != torch.float8_e4m3fn:
            return w.float()
        scale = rank.get(prefix + ".weights_scaling_factor", rank.get(prefix + ".per_channel_scale"))
        return dequantize(w, scale)

    out = {
        "model.embed_tokens.weight": torch.cat([r["transformer.vocab_embedding.weight"] for r in ranks])[
            : cfg["vocab_size"]
        ].float(),
        "model.norm.weight": ranks[0]["transformer.ln_f.weight"].float(),
        "lm_head.weight": torch.cat([r["lm_head.weight"] for r in ranks])[: cfg["vocab_size"]].float(),
    }
    for i in range(cfg["num_hidden_layers"]):
        p, h = f"transformer.layers.{i}.", f"model.layers.{i}."
        qs, ks, vs = [], [], []
        for r in ranks:
            qkv = deq(r, p + "attention.qkv")
            nq, nk = nh // tp * hs, max(nkv // tp, 1) * hs
            qs.append(qkv[:nq])
            ks.append(qkv[nq : nq + nk])
            vs.append(qkv[nq + nk :])
        out[h + "self_attn.q_proj.weight"] = torch.cat(qs)
        out[h + "self_attn.k_proj.weight"] = _unreplicate(torch.cat(ks), rep, hs)
        out[h + "self_attn.v_proj.weight"] = _unreplicate(torch.cat(vs), rep, hs)
        out[h + "self_attn.o_proj.weight"] = torch.cat([deq(r, p + "attention.dense") for r in ranks], 1)
        out[h + "mlp.gate_proj.weight"] = torch.cat([deq(r, p + "mlp.fc") for r in ranks])
        out[h + "mlp.up_proj.weight"] = torch.cat([deq(r, p + "mlp.gate") for r in ranks])
        out[h + "mlp.down_proj.weight"] = torch.cat([deq(r, p + "mlp.proj") for r in ranks], 1)
        out[h + "input_layernorm.weight"] = ranks[0][p + "input_layernorm.weight"].float()
        out[h + "post_attention_layernorm.weight"] = ranks[0][p + "post_layernorm.weight"].float()
    return out, ranks


def assert_within_fp8_rounding(name, got, want, scale):
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= scale * 2^-10 for subnormals.
    bound = want.abs() * 2**-4 + scale * 2**-9
    err = (got - want).abs()
    assert (err <= bound).all(), f"{name}: max err {err.max():.3g} exceeds FP8 rounding"


@pytest.mark.parametrize("quant", ["fp8", "fp8-pc-pt", "bf16"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_dequantized_checkpoint_reproduces_hf_weights(tmp_path, quant, tp):
    model = make_tiny_model(tmp_path / "hf", tie_word_embeddings=(tp == 2), **SHAPE)
    out = tmp_path / "ckpt"
    out.mkdir()
    calib = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    convert(model, out, quant=quant, tp=tp, calib_ids=calib)
    cfg = json.loads((out / "config.json").read_text())
    merged, ranks = merged_hf_weights(out, cfg)
    hf = {k: v.float() for k, v in load_file(str(model / "model.safetensors")).items()}
    if "lm_head.weight" not in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    assert set(merged) == set(hf)
    for name, want in hf.items():
        got = merged[name]
        assert got.shape == want.shape, name
        if quant == "bf16" or not name.endswith("proj.weight"):  # norms, embedding, lm_head: never quantized
            assert torch.equal(got, want), name
        else:
            scale = want.abs().amax(dim=1, keepdim=True) / 448 if quant == "fp8-pc-pt" else want.abs().max() / 448
            assert_within_fp8_rounding(name, got, want, scale)
    if quant == "fp8":  # one scale per fused linear, identical on every rank
        for key in ranks[0]:
            if key.endswith("scaling_factor"):
                assert all(torch.equal(r[key], ranks[0][key]) for r in ranks), key


def test_config_json_fields(tmp_path):
    model = make_tiny_model(tmp_path / "hf", spelling="tf5", **SHAPE)
    out = tmp_path / "ckpt"
    out.mkdir()
    convert(model, out, quant="fp8", kv_cache="fp8", tp=2, calib_ids=torch.randint(0, 250, (2, 16)))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rotary_base"] == 1e6 and cfg["head_size"] == 16 and cfg["hidden_size"] == 80
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    r0 = load_file(str(out / "rank0.safetensors"))
    assert r0["lm_head.weight"].shape == (125, 80) and r0["lm_head.weight"].dtype == torch.bfloat16
    assert r0["transformer.layers.0.attention.kv_cache_scaling_factor"].item() >= 1.0
