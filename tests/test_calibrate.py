"""Layer-by-layer calibration against hooks on transformers' whole-model forward pass: bit-identical amax."""

import importlib

import pytest
import torch
from tiny_models import llama3_scaling, make_tiny_model
from transformers import AutoModelForCausalLM

from nim_build.builder.calibrate import LAYER_WEIGHTS, LayerCalibrator
from nim_build.builder.source import open_source


@pytest.mark.parametrize("arch, scaling", [("MistralForCausalLM", None), ("LlamaForCausalLM", llama3_scaling())])
def test_layerwise_amax_equals_full_model_hooks(tmp_path, monkeypatch, arch, scaling):
    model_dir = make_tiny_model(
        tmp_path / "hf",
        arch=arch,
        rope_scaling=scaling,
        num_layers=3,
        hidden_size=80,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    source = open_source(model_dir)
    spec, reader = source.spec, source.reader
    calibrator = LayerCalibrator(source, ids, want_kv=True, batch_size=2)
    got = [
        calibrator.run_layer(i, {s: reader.get(f"model.layers.{i}.{s}") for s in LAYER_WEIGHTS})
        for i in range(spec.num_hidden_layers)
    ]

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    want = {}

    def hook(key, output=False):
        def fn(mod, args, out=None):
            t = (out if output else args[0]).abs().amax().float()
            want[key] = torch.maximum(want.get(key, t), t)

        return fn

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_pre_hook(hook((i, "qkv_in")))
        layer.self_attn.o_proj.register_forward_pre_hook(hook((i, "dense_in")))
        layer.mlp.gate_proj.register_forward_pre_hook(hook((i, "fc_in")))
        layer.mlp.down_proj.register_forward_pre_hook(hook((i, "proj_in")))
        layer.self_attn.v_proj.register_forward_hook(hook((i, "v"), True))
    # K is measured after RoPE (as modelopt's k_bmm_quantizer sees it): record what the HF attention computes.
    modeling = importlib.import_module(type(model).__module__)
    original, calls = modeling.apply_rotary_pos_emb, []

    def recording_rope(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = original(q, k, cos, sin, *args, **kwargs)
        calls.append(k_embed.abs().amax().float())
        return q_embed, k_embed

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", recording_rope)
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 3
    for i, k_amax in enumerate(calls):
        want[(i, "k")] = k_amax
    for (i, key), value in want.items():
        assert torch.equal(getattr(got[i], key), value), (i, key, getattr(got[i], key), value)


def test_layerwise_reference_forward_equals_transformers(tmp_path):
    """The accuracy gate's reference (one decoder layer in memory at a time) is transformers' forward, bit for bit."""
    from nim_build.builder.calibrate import reference_forward

    model_dir = make_tiny_model(
        tmp_path / "hf",
        arch="LlamaForCausalLM",
        rope_scaling=llama3_scaling(),
        tie_word_embeddings=True,
        hidden_size=80,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    logits, hidden = reference_forward(open_source(model_dir), ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(logits, want.logits.reshape(-1, 256))
    assert len(hidden) == len(want.hidden_states)
    assert all(torch.equal(h, w.reshape(-1, 80)) for h, w in zip(hidden, want.hidden_states))
