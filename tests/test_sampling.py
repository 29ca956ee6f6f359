"""TensorRT-LLM's sampling semantics in the reference runtime.

The rules come from TensorRT-LLM's sources (tensorrtllm_backend c2e65b8 inflight_batcher_llm/src/utils.cc:551-609,
TensorRT-LLM kernels/samplingTopKKernels.cu setupTopKRuntimeArgs, kernels/penaltyKernels.cu batchApplyPenalty,
docs/TRITON.md); the penalties are checked against transformers' own logits processors where it has one, log
probs and logits against a separate forward pass over the whole sequence (no KV cache, no batching)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from nim_build.errors import UserError
from nim_build.runtime import DecoderModel, LLMEngine, SamplingParams, SeqChunk, from_trtllm
from nim_build.runtime.sampling import choose, log_probs, process_logits

VOCAB = 50


@pytest.mark.parametrize(
    "inputs, greedy, top_k, top_p",
    [
        ({}, True, 1, 1.0),  # nothing set: k=0, p=0 -> k=1
        ({"top_k": 0, "top_p": 0.0, "temperature": 1.0}, True, 1, 1.0),  # what upstream clients send
        ({"top_p": -1.0}, True, 1, 1.0),  # top_p <= 0 is unset
        ({"top_k": 5}, False, 5, 1.0),  # pure top-k
        ({"top_k": 0, "top_p": 1.0}, False, 0, 1.0),  # full-vocabulary sampling, not greedy
        ({"top_p": 0.9}, False, 0, 0.9),
        ({"top_k": 4, "top_p": 0.5}, False, 4, 0.5),
        ({"top_k": 4, "temperature": 0.0}, True, 1, 1.0),  # temperature 0 is greedy
    ],
)
def test_trtllm_sampling_rules(inputs, greedy, top_k, top_p):
    p = from_trtllm(8, **inputs)
    assert (p.greedy, p.top_k, p.top_p) == (greedy, top_k, top_p)
    assert p.temperature == inputs.get("temperature") or p.temperature == 1.0
    p.validate()


@pytest.mark.parametrize("inputs, match", [({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k")])
def test_trtllm_sampling_rejects_what_tensorrt_llm_rejects(inputs, match):
    with pytest.raises(UserError, match=match):
        from_trtllm(8, **inputs)


def test_repetition_penalty_and_min_tokens_match_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(VOCAB, generator=g) * 3
    context = [3, 7, 7, 11, 3, 3, 0]
    end_id = 2
    p = SamplingParams(8, repetition_penalty=1.3, min_tokens=4)
    got = process_logits(logits, p, context, generated=2, end_id=end_id)
    ids = torch.tensor([context])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[None].clone())
    ref = MinNewTokensLengthLogitsProcessor(len(context) - 2, 4, end_id)(ids, ref)[0]
    assert torch.equal(got, ref)
    assert process_logits(logits, p, context, generated=4, end_id=end_id)[end_id] > float("-inf")


def test_presence_frequency_temperature_and_bias_in_tensorrt_llms_order():
    """batchApplyPenalty: logit += bias; logit *= 1/T; repetition; -= presence (once); -= frequency * count."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(VOCAB, generator=g)
    bias = torch.randn(VOCAB, generator=g).tolist()
    context = [5, 5, 5, 9]
    p = SamplingParams(8, temperature=0.7, presence_penalty=0.4, frequency_penalty=0.25, embedding_bias=bias)
    got = process_logits(logits, p, context, generated=1, end_id=-1)
    ref = (logits.double() + torch.tensor(bias, dtype=torch.float64)) / 0.7
    ref[5] -= 0.4 + 0.25 * 3
    ref[9] -= 0.4 + 0.25
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_log_probs_normalisation():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    greedy = from_trtllm(4, return_log_probs=True)
    tok = choose(logits, greedy, None)
    out, raw = log_probs(logits, tok, greedy)
    assert tok == 0 and out == 0.0  # TensorRT-LLM's top-k layer renormalises over the top-1 set
    assert raw == pytest.approx(float(torch.log_softmax(logits, 0)[0]))
    plain = SamplingParams(4, top_k=1, return_log_probs=True, normalize_log_probs=False)
    assert log_probs(logits, 0, plain) == (raw, raw)


@pytest.fixture(scope="module")
def small_model(tiny_checkpoint):
    _, ckpt = tiny_checkpoint("bf16", 1)
    return DecoderModel.from_checkpoint(ckpt)


def _run(engine, prompt, params):
    events = []
    engine.submit(prompt, params, events.append)
    while not (events and events[-1].finished):
        engine.step()
    return events


def test_log_probs_and_logits_equal_a_forward_pass_over_the_whole_sequence(small_model):
    engine = LLMEngine(small_model, max_seq_len=128, max_batch_size=4, tokens_per_block=8, end_id=-1)
    prompt = list(range(3, 23))
    params = SamplingParams(
        6,
        top_k=1,
        return_log_probs=True,
        normalize_log_probs=False,
        return_context_logits=True,
        return_generation_logits=True,
    )
    events = _run(engine, prompt, params)
    out = [t for ev in events for t in ev.token_ids]
    full = prompt + out
    ref = small_model.forward(torch.tensor(full), [SeqChunk(0, len(full))], all_logits=True).logits
    assert torch.allclose(events[0].context_logits, ref[: len(prompt)], atol=1e-4)
    gen = torch.stack([row for ev in events for row in ev.generation_logits or []])
    assert torch.allclose(gen, ref[len(prompt) - 1 : -1], atol=1e-4)
    logp = torch.log_softmax(ref[len(prompt) - 1 : -1], -1)[torch.arange(len(out)), torch.tensor(out)]
    got = torch.tensor([lp for ev in events for lp in ev.log_probs or []])
    assert torch.allclose(got, logp, atol=1e-4)
    assert events[-1].cum_log_prob == pytest.approx(float(logp.sum()), abs=1e-3)
    assert out == [int(i) for i in ref[len(prompt) - 1 : -1].argmax(-1)]  # greedy


def test_min_tokens_and_penalties_through_the_engine(small_model):
    engine = LLMEngine(small_model, max_seq_len=128, max_batch_size=4, tokens_per_block=8, end_id=-1)
    prompt = list(range(3, 13))
    base = [t for ev in _run(engine, prompt, SamplingParams(8)) for t in ev.token_ids]
    stop_at = base[0]
    engine_end = LLMEngine(small_model, max_seq_len=128, max_batch_size=4, tokens_per_block=8, end_id=stop_at)
    assert [t for ev in _run(engine_end, prompt, SamplingParams(8)) for t in ev.token_ids] == []
    forced = [t for ev in _run(engine_end, prompt, SamplingParams(8, min_tokens=3)) for t in ev.token_ids]
    assert len(forced) >= 3 and stop_at not in forced[:3]
    heavy = [t for ev in _run(engine, prompt, SamplingParams(8, frequency_penalty=1e4)) for t in ev.token_ids]
    assert not set(heavy) & set(prompt) and len(set(heavy)) == len(heavy)  # nothing seen is ever chosen again
