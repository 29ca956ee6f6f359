"""Accuracy gate: metrics of HF vs the reference runtime, gate failures and the per-layer diagnosis."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import convert, make_calib_ids

from nim_build.builder.accuracy import check_gate, evaluate
from nim_build.builder.source import open_source
from nim_build.runtime import DecoderModel, SeqChunk

NEMO_SHAPE = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32, num_layers=4)
EVAL = torch.as_tensor(make_calib_ids(n=3, seq=40, seed=7))


def test_bf16_checkpoint_is_the_same_function(tiny_checkpoint):
    hf, ckpt = tiny_checkpoint("bf16", 2, **NEMO_SHAPE)
    r = evaluate(open_source(hf), ckpt, EVAL)
    assert r["tokens"] == 120 and r["top1_agreement"] == 1.0
    assert abs(r["mean_kl"]) < 1e-6 and r["max_abs_logit_error"] < 1e-4 and abs(r["ppl_increase"]) < 1e-5
    assert len(r["layer_rel_error"]) == 4 + 1 and max(r["layer_rel_error"]) < 1e-5
    assert check_gate(r) == []


def test_fp8_checkpoint_passes_with_small_measured_error(tiny_checkpoint):
    hf, ckpt = tiny_checkpoint("fp8", 1, **NEMO_SHAPE)
    r = evaluate(open_source(hf), ckpt, [EVAL[0].tolist(), EVAL[1:]])  # id lists and [batch, seq] tensors both work
    assert r["tokens"] == 120
    assert 0 < r["mean_kl"] < 1e-3 and 0 < r["layer_rel_error"][-1] < 0.1
    assert check_gate(r) == []


def test_failing_gate_names_the_broken_layer(tiny_checkpoint, tmp_path):
    hf, ckpt = tiny_checkpoint("bf16", 1, **NEMO_SHAPE)
    tensors = load_file(ckpt / "rank0.safetensors")
    name = "transformer.layers.2.mlp.proj.weight"
    tensors[name] = tensors[name] * 8  # a wrong scale in one layer
    save_file(tensors, tmp_path / "rank0.safetensors")
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    r = evaluate(open_source(hf), tmp_path, EVAL)
    failures = check_gate(r, min_top1=0.999, max_ppl_increase=0.0)
    assert failures and failures[-1].startswith("diagnosis: hidden-state relative error jumps at layer 2 ")
    assert r["layer_rel_error"][2] < 1e-5 < r["layer_rel_error"][3]
    assert any("top-1 agreement" in f or "perplexity" in f for f in failures[:-1])


def test_gate_thresholds():
    report = {
        "tokens": 10,
        "top1_agreement": 0.9,
        "ppl_reference": 10.0,
        "ppl_quantized": 10.5,
        "ppl_increase": 0.05,
        "layer_rel_error": [0.0, 0.01, 0.012, 0.2, 0.21],
    }
    failures = check_gate(report)
    assert failures[0].startswith("top-1 agreement 0.9000 < 0.95") and "+5.00%" in failures[1]
    assert "jumps at layer 2 (0.012 -> 0.2, x16.7); largest at layer 3 + final norm (0.21)" in failures[2]
    assert check_gate(report, min_top1=0.9, max_ppl_increase=0.05) == []


def _fake_quant_hf_weights(model: torch.nn.Module) -> None:
    """FP8 weight rounding applied inside transformers, independently of the runtime: per-tensor scales,
    one for the fused q/k/v and one shared by gate/up (as the exporter does)."""

    def q(ws):
        scale = torch.stack([w.abs().amax() for w in ws]).amax() / 448
        for w in ws:
            w.copy_((w / scale).to(torch.float8_e4m3fn).float() * scale)

    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for group in (
                [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight],
                [a.o_proj.weight],
                [m.gate_proj.weight, m.up_proj.weight],
                [m.down_proj.weight],
            ):
                q(group)


def test_default_model_fp8_runtime_equals_fp8_rounding_inside_transformers(default_model_dir, tmp_path):
    """SmolLM2-135M (real weights): the FP8 checkpoint through the runtime (weights only, activations unrounded)
    computes what transformers computes with the same FP8-rounded weights."""
    from nim_build.builder.calib_data import token_batch

    ids = token_batch(open_source(default_model_dir).tokenizer, 2, 64)
    convert(default_model_dir, tmp_path, quant="fp8", calib_ids=ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    _fake_quant_hf_weights(hf)
    with torch.no_grad():
        ref = hf(ids).logits.reshape(-1, hf.config.vocab_size)
    ours = DecoderModel.from_checkpoint(tmp_path, fake_quant_activations=False)
    got = ours.forward(ids.reshape(-1), [SeqChunk(0, 64)] * 2, all_logits=True).logits
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()


def test_default_model_bf16_checkpoint_passes_the_gate(default_model_dir, smollm2_bf16_checkpoint):
    from nim_build.builder.calib_data import token_batch

    source = open_source(default_model_dir)
    r = evaluate(source, smollm2_bf16_checkpoint, token_batch(source.tokenizer, 2, 64))
    assert r["top1_agreement"] >= 0.99 and abs(r["ppl_increase"]) < 1e-3 and r["max_abs_logit_error"] < 1e-2
    assert check_gate(r) == []


@pytest.fixture(scope="module")
def smollm2_fp8_build(default_model_dir, tmp_path_factory):
    """`nim_build engine` on the default model with its own gate defaults (the full build: calibration, gate)."""
    from nim_build.builder.pipeline import build
    from nim_build.options import BuildOptions

    out = tmp_path_factory.mktemp("gate") / "smollm2-fp8"
    summary = build(
        BuildOptions(model=str(default_model_dir), out=str(out), backend="reference", max_seq_len=512), progress=False
    )
    return out, summary


def test_default_model_fp8_build_passes_its_gate(smollm2_fp8_build):
    from nim_build.builder.default_model import FP8_GATE

    out, summary = smollm2_fp8_build
    acc = json.loads((out / "manifest.json").read_text())["accuracy"]
    assert acc == summary["accuracy"]
    assert acc["gate"] == {"min_top1": FP8_GATE[0], "max_ppl_increase": FP8_GATE[1], "passed": True, "failures": []}
    assert FP8_GATE[0] <= acc["top1_agreement"] < 0.95 and 0 < acc["ppl_increase"] <= FP8_GATE[1]


def test_default_model_gate_still_fails_a_wrong_scale(smollm2_fp8_build, default_model_dir, tmp_path):
    """The relaxed thresholds are not blind: one layer's weight scale off by 2x fails them and is located."""
    from nim_build.builder.calib_data import token_batch
    from nim_build.builder.default_model import FP8_GATE

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(smollm2_fp8_build[0] / "checkpoint", ckpt)
    tensors = load_file(ckpt / "rank0.safetensors")
    tensors["transformer.layers.10.mlp.fc.weights_scaling_factor"] *= 2
    save_file(tensors, ckpt / "rank0.safetensors")
    source = open_source(default_model_dir)
    report = evaluate(source, ckpt, token_batch(source.tokenizer, 8, 128))
    failures = check_gate(report, *FP8_GATE)
    assert failures and "layer 10" in failures[-1]


def test_gate_thresholds_per_model(default_model_dir, tmp_path):
    from nim_build.builder.default_model import FP8_GATE
    from nim_build.builder.pipeline import gate_thresholds
    from nim_build.options import DEFAULT_GATE, BuildOptions

    assert gate_thresholds(BuildOptions(model="default"), default_model_dir) == FP8_GATE
    assert gate_thresholds(BuildOptions(model=str(default_model_dir)), default_model_dir) == FP8_GATE
    assert gate_thresholds(BuildOptions(model="mistralai/Mistral-Nemo-Instruct-2407"), tmp_path) == DEFAULT_GATE
    assert gate_thresholds(BuildOptions(model="default", min_top1=0.9, max_ppl_increase=0.05), tmp_path) == (0.9, 0.05)
