"""Reference runtime vs transformers: checkpoint loading (any tp), decoder numerics, FP8 paths, engine dir layout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_models import llama3_scaling

from nim_build.builder.manifest import write_manifest
from nim_build.errors import CheckpointError, UserError
from nim_build.runtime import DecoderModel, LLMEngine, SamplingParams, SeqChunk
from nim_build.runtime import model as model_module
from nim_build.runtime.checkpoint import load_checkpoint
from nim_build.runtime.kv_cache import PagedKVCache

NEMO_SHAPE = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32)  # head_dim != hidden/heads, GQA


def hf_logits(hf_dir, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(ids[None]).logits[0]


def ours_logits(ckpt, ids: torch.Tensor, **kw) -> torch.Tensor:
    model = DecoderModel.from_checkpoint(ckpt, **kw)
    return model.forward(ids, [SeqChunk(0, len(ids))], all_logits=True).logits


IDS = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bf16_nemo_shape_matches_transformers_tightly(tiny_checkpoint, tp):
    # tp 4 with 2 KV heads: the converter replicates each KV head twice, the loader must take it once
    hf, ckpt = tiny_checkpoint("bf16", tp, **NEMO_SHAPE)
    ref, ours = hf_logits(hf, IDS), ours_logits(ckpt, IDS)
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("quant", ["fp8", "fp8-pc-pt"])
def test_fp8_nemo_shape_matches_within_fp8_tolerance(tiny_checkpoint, tp, quant):
    hf, ckpt = tiny_checkpoint(quant, tp, **NEMO_SHAPE)
    ref, ours = hf_logits(hf, IDS), ours_logits(ckpt, IDS)
    err = (ours - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05  # FP8 rounding is visible, but small
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_fp8_weights_stay_fp8_and_ranks_merge_to_one_scale(tiny_checkpoint):
    _, ckpt = tiny_checkpoint("fp8", 2, **NEMO_SHAPE)
    c = load_checkpoint(ckpt)
    qkv = c.layers[0].qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight.shape == ((4 + 2 * 2) * 32, 64)
    assert qkv.w_scale.shape == (1, 1) and qkv.a_scale.shape == (1, 1)
    assert c.layers[0].dense.weight.shape == (64, 4 * 32) and c.lm_head.weight.dtype == torch.bfloat16


def test_fp8_weights_dequantized_at_load_give_the_bits_of_dequantizing_per_call(tiny_checkpoint, monkeypatch):
    """FP8 weights become the compute dtype once, at load, when that fits the memory (never per step), with
    gate_proj and up_proj in one GEMM; when it does not fit they stay FP8: the logits are the same bits."""
    _, ckpt = tiny_checkpoint("fp8", 1, **NEMO_SHAPE)
    model = DecoderModel.from_checkpoint(ckpt)
    assert model.dequantize_fp8 and model.layers[0].fc.weight.dtype == torch.float32 and model.layers[0].gate is None
    monkeypatch.setattr(model_module, "DEQUANTIZE_AT_LOAD_MAX_SHARE", 0.0)
    per_call = DecoderModel.from_checkpoint(ckpt)
    assert not per_call.dequantize_fp8 and per_call.layers[0].fc.weight.dtype == torch.float8_e4m3fn
    ids = IDS[:9]
    assert torch.equal(
        model.forward(ids, [SeqChunk(0, 9)], all_logits=True).logits,
        per_call.forward(ids, [SeqChunk(0, 9)], all_logits=True).logits,
    )


def test_activation_fake_quant_is_on_for_fp8_and_can_be_turned_off(tiny_checkpoint):
    hf, ckpt = tiny_checkpoint("fp8", 1, **NEMO_SHAPE)
    assert DecoderModel.from_checkpoint(ckpt).fake_quant
    on, off = ours_logits(ckpt, IDS), ours_logits(ckpt, IDS, fake_quant_activations=False)
    assert not torch.equal(on, off) and (on - off).abs().max() < 0.05 * on.abs().max()


@pytest.mark.parametrize(
    "model_kw",
    [
        dict(arch="LlamaForCausalLM", rope_scaling=llama3_scaling("rope_type"), tie_word_embeddings=True),
        dict(arch="LlamaForCausalLM", rope_scaling={"type": "linear", "factor": 4.0}, spelling="tf457"),
        dict(rope_theta=10000.0, spelling="tf5", num_kv_heads=4),
    ],
)
def test_rope_variants_and_tied_embeddings_match_transformers(tiny_checkpoint, model_kw):
    hf, ckpt = tiny_checkpoint("bf16", 1, **model_kw)
    ids = torch.arange(300) % 256  # past original_max_position_embeddings=256 of the llama3 dict
    assert (ours_logits(ckpt, ids) - hf_logits(hf, ids)).abs().max() < 1e-4


def test_paged_cache_and_chunks_give_the_full_forward_result(tiny_checkpoint):
    _, ckpt = tiny_checkpoint("fp8", 1, kv_cache="fp8", **NEMO_SHAPE)
    model = DecoderModel.from_checkpoint(ckpt)
    assert model.kv_fp8 and all(float(s) >= 1.0 for s in model.kv_scales())
    full = model.forward(IDS, [SeqChunk(0, 24)], all_logits=True).logits
    c = model.cfg
    cache = PagedKVCache(c.num_layers, 8, 4, c.num_kv_heads, c.head_size, model.dtype, model.device, model.kv_scales())
    assert cache.k[0].element_size() == 1
    blocks = [5, 2, 7, 0, 3, 1]  # scattered blocks
    rows = []
    for start, end in [(0, 10), (10, 11), (11, 20), (20, 24)]:
        rows.append(model.forward(IDS[start:end], [SeqChunk(start, end - start, blocks)], cache).logits[0])
    assert torch.allclose(torch.stack(rows), full[[9, 10, 19, 23]], atol=1e-5)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_decode_attention_is_exact_and_batch_invariant(tiny_checkpoint, compute_dtype):
    """Decode tokens of all sequences attend together, split over their cache blocks (block size 4 here): each
    sequence's logits equal its full forward pass without a cache (one softmax per row) and are the same bits alone
    and in any batch; lengths cover one block, block boundaries and a prefill whose last tile has one query. In
    both compute dtypes (bf16 is what serving computes in on a CPU with native bf16; GEMMs then run in oneDNN)."""
    _, ckpt = tiny_checkpoint("bf16", 1, **NEMO_SHAPE)
    model = DecoderModel.from_checkpoint(ckpt, compute_dtype=compute_dtype)
    tol = 1e-5 if compute_dtype == torch.float32 else 0.05  # a bf16 rounding of the attention output may flip
    c = model.cfg
    cache = PagedKVCache(c.num_layers, 64, 4, c.num_kv_heads, c.head_size, model.dtype, model.device)
    seqs = [IDS[:n] for n in (1, 4, 5, 8, 9, 23)]
    tables = [list(range(60 - 8 * i, 52 - 8 * i, -1)) for i in range(len(seqs))]  # scattered, descending blocks
    for ids, table in zip(seqs, tables):
        if len(ids) > 1:  # the last tile of a 5- or 9-token prefill has one query: attended like a decode token
            model.forward(ids[:-1], [SeqChunk(0, len(ids) - 1, table)], cache)

    def decode(which):
        return model.forward(
            torch.stack([seqs[i][-1] for i in which]), [SeqChunk(len(seqs[i]) - 1, 1, tables[i]) for i in which], cache
        ).logits

    alone = [decode([i])[0] for i in range(len(seqs))]
    for i, ids in enumerate(seqs):
        full = model.forward(ids, [SeqChunk(0, len(ids))], all_logits=True).logits[-1]
        assert (alone[i] - full).abs().max() < tol, i
    for which in ([0, 1, 2, 3, 4, 5], [5, 0], [3, 1, 4], [2, 5, 1, 0]):
        batch = decode(which)
        assert all(torch.equal(batch[j], alone[i]) for j, i in enumerate(which)), which

    # A chunk off the block grid (callers of forward() may cut anywhere) beside a decode token: its one-query tile
    # at 11 is not its last and attends on its own, its last tile (16) with the decode token.
    long, table = IDS[:17], list(range(7))
    model.forward(long[:11], [SeqChunk(0, 11, table)], cache)
    out = model.forward(
        torch.cat([long[11:], seqs[3][-1:]]),
        [SeqChunk(11, 6, table), SeqChunk(7, 1, tables[3])],
        cache,
        all_logits=True,
    ).logits
    full = model.forward(long, [SeqChunk(0, 17)], all_logits=True).logits
    assert (out[:6] - full[11:]).abs().max() < tol
    assert torch.equal(out[6], alone[3])


def test_missing_rank_file_is_a_clear_error(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint("bf16", 2, **NEMO_SHAPE)
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    (tmp_path / "rank0.safetensors").write_bytes((ckpt / "rank0.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="rank1.safetensors"):
        load_checkpoint(tmp_path)


def make_engine_dir(root, ckpt, **build):
    """ENGINE/checkpoint/ + ENGINE/tokenizer/ + ENGINE/manifest.json as nim_build engine writes them."""
    engine = root / "engine"
    (engine / "checkpoint").mkdir(parents=True)
    for f in ckpt.iterdir():
        (engine / "checkpoint" / f.name).write_bytes(f.read_bytes())
    (engine / "tokenizer").mkdir()
    write_manifest(
        engine,
        {
            "name": "tiny",
            "backend": "reference",
            "build": {"max_seq_len": 128, "max_batch_size": 4, "max_num_tokens": 64, **build},
            "tokenizer": {"dir": "tokenizer", "kind": "hf", "bos_id": 1, "end_id": 2, "pad_id": 2},
        },
    )
    return engine


def test_engine_dir_layout_sets_limits_and_ids(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint("fp8", 2, **NEMO_SHAPE)
    engine = LLMEngine.from_engine_dir(make_engine_dir(tmp_path, ckpt), device="cpu", kv_cache_bytes=1 << 20)
    assert (engine.max_seq_len, engine.max_batch_size, engine.max_num_tokens) == (128, 4, 64)
    assert (engine.end_id, engine.pad_id, engine.vocab_size) == (2, 2, 256)
    out = engine.generate([5, 6, 7], SamplingParams(8, end_id=-1))
    assert len(out) == 8 and all(0 <= t < 256 for t in out)
    engine.shutdown()
    with pytest.raises(UserError, match="manifest"):
        LLMEngine.from_engine_dir(ckpt)


def test_default_model_bf16_reproduces_transformers_greedy_generation(default_model_dir, smollm2_bf16_checkpoint):
    """SmolLM2-135M-Instruct (real weights), bf16 checkpoint, float32 compute on both sides: same tokens."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    model = DecoderModel.from_checkpoint(smollm2_bf16_checkpoint)
    engine = LLMEngine(model, max_seq_len=256, max_batch_size=4, end_id=-1)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=2)[
            0, len(ids) :
        ].tolist()
        assert engine.generate(ids, SamplingParams(20, end_id=-1)) == ref, prompt
    engine.shutdown()


def test_bf16_serving_mode_is_as_close_to_float32_transformers_as_transformers_bf16(
    default_model_dir, smollm2_bf16_checkpoint
):
    """What serving computes in on a CPU with native bf16 (oneDNN GEMMs, float32 attention) against transformers'
    float32 forward pass, measured beside transformers' own bf16 forward pass: no further from it."""
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    text = (
        "The history of the river city begins in the twelfth century, when merchants from the north settled along "
        "the banks and built the first stone bridge. Over the following centuries the town grew into a market for "
        "wool and grain; its guilds raised the cathedral, and in 1842 the railway reached it from the capital."
    )
    ids = torch.tensor(tok(text)["input_ids"])
    with torch.no_grad():
        ref = hf_logits(default_model_dir, ids)
        hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16)
        theirs = hf_bf16(ids[None]).logits[0].float()
    ours = ours_logits(smollm2_bf16_checkpoint, ids, compute_dtype=torch.bfloat16)

    def kl(x):
        return F.kl_div(x.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()

    assert kl(ours) <= 1.5 * kl(theirs)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_checkpoint_config_is_read_from_config_json(tiny_checkpoint):
    _, ckpt = tiny_checkpoint("bf16", 1, **NEMO_SHAPE)
    cfg = json.loads((ckpt / "config.json").read_text())
    c = load_checkpoint(ckpt).config
    assert (c.head_size, c.num_kv_heads, c.rotary_base) == (32, 2, cfg["rotary_base"]) == (32, 2, 1e6)


@pytest.mark.parametrize("quant", ["fp8", "fp8-pc-pt"])
def test_scaled_mm_path_equals_the_dequantize_path(tiny_checkpoint, quant, monkeypatch):
    """The native FP8 GEMM path (selected on CUDA >= 8.9) through torch._scaled_mm, which the CPU build also runs."""
    _, ckpt = tiny_checkpoint(quant, 1, **NEMO_SHAPE)
    monkeypatch.setattr(model_module, "DEQUANTIZE_AT_LOAD_MAX_SHARE", 0.0)  # FP8 weights kept, as on CUDA
    model = DecoderModel.from_checkpoint(ckpt)
    ref = model.forward(IDS, [SeqChunk(0, len(IDS))], all_logits=True).logits
    calls, scaled_mm = [], torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or scaled_mm(*a, **kw))
    model.native_fp8 = True
    got = model.forward(IDS, [SeqChunk(0, len(IDS))], all_logits=True).logits
    assert len(calls) == 4 * model.cfg.num_layers  # qkv, dense, fc + gate (one GEMM), proj of every layer
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()  # per-token scaling returns bf16 from the GEMM
    # What serving computes on a CPU with native bf16, the same GEMM in bf16: FP8 input values times the packed
    # weights with the scales folded in.
    monkeypatch.undo()
    bf16 = DecoderModel.from_checkpoint(ckpt, compute_dtype=torch.bfloat16)
    if bf16.dequantize_fp8 and bf16.layers[0].qkv.packed is not None:
        assert bf16.layers[0].qkv.scaled_input
        served = bf16.forward(IDS, [SeqChunk(0, len(IDS))], all_logits=True).logits
        assert (served - got).abs().max() < 0.05 * got.abs().max()
        assert (served.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9
