"""In-flight batching: batching changes no result, a small KV pool queues requests, cancellation frees blocks,
sampling / stop conditions / streaming / timing per request.

The runtime is batch invariant (nim_build/runtime/model.py): a request's logits are the same bits alone and in any
batch, which the tests check directly, not only through the greedy tokens."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest
import torch

from nim_build.builder.manifest import CHECKPOINT_DIR
from nim_build.errors import UserError
from nim_build.runtime import DecoderModel, LLMEngine, SamplingParams
from nim_build.runtime.kv_cache import PagedKVCache

NEMO_SHAPE = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    _, ckpt = tiny_checkpoint("fp8", 1, kv_cache="fp8", **NEMO_SHAPE)
    return DecoderModel.from_checkpoint(ckpt)


def make_engine(model, **kw):
    """Prompts up to 100 tokens with max_num_tokens 48: prefill is chunked (enable_chunked_context)."""
    kw = {
        "max_seq_len": 256,
        "max_batch_size": 8,
        "max_num_tokens": 48,
        "tokens_per_block": 8,
        "end_id": -1,
        "enable_chunked_context": True,
        **kw,
    }
    return LLMEngine(model, **kw)


def workload(n, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(3, 256) for _ in range(rng.randint(1, 100))], rng.randint(1, 24)) for _ in range(n)]


def alone(model, reqs, **params):
    engine = make_engine(model)
    out = [engine.generate(p, SamplingParams(n, **params)) for p, n in reqs]
    engine.shutdown()
    return out


def run_interleaved(engine, reqs, arrivals=0, **params):
    """Submit the requests at random steps; returns the streamed tokens per request (in submit order) and the
    final events."""
    rng = random.Random(arrivals)
    streamed, finals, ids = {}, {}, []

    def on_event(ev):
        streamed.setdefault(ev.request_id, []).extend(ev.token_ids)
        if ev.finished:
            finals[ev.request_id] = ev

    pending = list(reqs)
    while pending or engine.has_work():
        while pending and rng.random() < 0.4:
            prompt, n = pending.pop(0)
            ids.append(engine.submit(prompt, SamplingParams(n, **params), on_event))
        engine.step()
    return [streamed.get(i, []) for i in ids], [finals[i] for i in ids]


def record_logits(engine) -> dict[int, list]:
    """The logits each request's tokens were sampled from, by request id (ids count submits from 1)."""
    seen = {}
    sample_next = engine._append

    def _append(req, logits, now):
        seen.setdefault(req.id, []).append(logits.clone())
        return sample_next(req, logits, now)

    engine._append = _append
    return seen


def assert_same_bits(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    for rid in ref:
        assert len(got[rid]) == len(ref[rid]) and all(torch.equal(x, y) for x, y in zip(got[rid], ref[rid])), rid


def test_inflight_batching_changes_no_result(model):
    reqs = workload(12)
    engine = make_engine(model)
    ref_logits = record_logits(engine)
    ref = [engine.generate(p, SamplingParams(n)) for p, n in reqs]
    engine = make_engine(model)
    logits = record_logits(engine)
    got, finals = run_interleaved(engine, reqs)
    assert got == ref
    assert_same_bits(logits, ref_logits)
    assert all(ev.finish_reason == "length" for ev in finals)
    stats = engine.stats()
    assert stats["max_seqs_in_step"] >= 4  # requests really shared steps
    assert stats["free_blocks"] == stats["total_blocks"] and stats["active"] == stats["waiting"] == 0


def test_small_kv_pool_queues_requests_and_all_finish(model):
    reqs = workload(8, seed=1)
    ref = alone(model, reqs)
    engine = make_engine(model, kv_cache_bytes=None)
    per_block = engine.cache.k[0][0].nbytes * 2 * model.cfg.num_layers  # K and V of one block, every layer
    engine = make_engine(model, kv_cache_bytes=per_block * 18)  # 144 tokens: two or three requests at a time
    seen_waiting = []
    orig_step = engine.step

    def step():
        orig_step()
        seen_waiting.append(engine.stats()["waiting"])

    engine.step = step
    got, _ = run_interleaved(engine, reqs, arrivals=2)
    assert got == ref
    assert max(seen_waiting) > 0 and engine.stats()["max_seqs_in_step"] <= 3
    with pytest.raises(UserError, match="whole pool"):
        engine.submit([5] * 150, SamplingParams(10), lambda ev: None)


def test_background_loop_with_concurrent_submitters(model):
    reqs = workload(8, seed=3)
    ref = alone(model, reqs)
    engine = make_engine(model)
    engine.start()
    results = [None] * len(reqs)

    def client(i):
        time.sleep(random.Random(i).random() * 0.2)
        results[i] = engine.generate(*[reqs[i][0], SamplingParams(reqs[i][1])])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.shutdown()
    assert results == ref


def test_cancel_frees_blocks_at_once(model):
    engine = make_engine(model)
    events = []
    rid = engine.submit(list(range(3, 40)), SamplingParams(100), events.append)
    other = engine.submit([5, 6, 7], SamplingParams(3), events.append)
    for _ in range(4):
        engine.step()
    assert engine.stats()["free_blocks"] < engine.stats()["total_blocks"]
    engine.cancel(rid)
    engine.cancel(other)
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]
    assert engine.stats()["active"] == 0
    engine.step()  # the loop delivers the final events
    finals = {ev.request_id: ev.finish_reason for ev in events if ev.finished}
    assert finals[rid] == "cancelled"
    assert not engine.has_work()
    waiting = engine.submit([5], SamplingParams(3), events.append)
    engine.cancel(waiting)  # still queued: never admitted
    engine.step()
    assert [ev.finish_reason for ev in events if ev.request_id == waiting] == ["cancelled"]


def test_seeded_sampling_is_per_request_and_unaffected_by_batching(model):
    reqs = workload(6, seed=4)
    params = dict(temperature=0.8, top_k=20, top_p=0.9, seed=1234)
    ref = alone(model, reqs, **params)
    got, _ = run_interleaved(make_engine(model), reqs, arrivals=5, **params)
    assert got == ref
    assert alone(model, reqs[:1], temperature=0.8, seed=99) != alone(model, reqs[:1], temperature=0.8, seed=1234)
    assert alone(model, reqs[:2], top_k=1, temperature=1.0) == alone(model, reqs[:2])  # top_k 1 is greedy


def test_stop_words_end_id_and_bad_words(model):
    prompt = list(range(3, 30))
    base = alone(model, [(prompt, 20)])[0]
    engine = make_engine(model)
    stop = base[5:7]
    events = []
    engine.submit(prompt, SamplingParams(20, stop_words=[[255, 254, 253], stop]), events.append)
    while not (events and events[-1].finished):
        engine.step()
    first = next(i for i in range(len(base)) if base[i : i + 2] == stop)
    # the stop sequence is part of the output, as TensorRT-LLM returns it (stopCriteriaKernels never shortens)
    assert sum((ev.token_ids for ev in events), []) == base[: first + 2]
    assert events[-1].finish_reason == "stop"
    events = []
    engine.submit(prompt, SamplingParams(20, end_id=base[3]), events.append)
    while not (events and events[-1].finished):
        engine.step()
    assert events[-1].finish_reason == "end_id"
    assert sum((ev.token_ids for ev in events), []) == base[: base.index(base[3])]
    banned = engine.generate(prompt, SamplingParams(20, bad_words=[[base[0]], [base[1], base[2]]]))
    assert banned[0] != base[0] and base[0] not in banned
    assert all(banned[i : i + 2] != [base[1], base[2]] for i in range(len(banned)))
    engine.shutdown()


def test_streaming_events_and_timing(model):
    engine = make_engine(model)
    events = []
    t0 = time.monotonic()
    engine.submit(list(range(3, 60)), SamplingParams(12), events.append)
    while not (events and events[-1].finished):
        engine.step()
    assert [len(ev.token_ids) for ev in events] == [1] * 12  # one token per step, streamed as generated
    last = events[-1]
    assert last.finish_reason == "length" and last.error is None
    assert t0 <= last.arrival <= last.first_token <= last.last_token <= time.monotonic()


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], SamplingParams(4), "empty prompt"),
        ([5], SamplingParams(0), "max_new_tokens"),
        ([5] * 250, SamplingParams(10), "max_seq_len"),
        ([5, 256], SamplingParams(4), "token ids"),
        ([5], SamplingParams(4, top_p=0.0), "top_p"),
    ],
)
def test_invalid_requests_are_rejected(model, prompt, params, match):
    with pytest.raises(UserError, match=match):
        make_engine(model).submit(prompt, params, lambda ev: None)


def test_batch_invariance_on_the_default_model(reference_engine_dir):
    """Real weights (SmolLM2-135M, FP8 with FP8 KV cache): every logit a request samples from is bit-identical
    alone and under in-flight batching with chunked prefill (prompts longer than max_num_tokens) and a KV pool
    that makes requests queue."""
    smollm2 = DecoderModel.from_checkpoint(reference_engine_dir / CHECKPOINT_DIR)
    blocks = 20  # of 32 tokens: two or three of these requests at a time

    def engine():
        c = smollm2.cfg
        per_block = PagedKVCache.bytes_per_block(
            c.num_layers, 32, c.num_kv_heads, c.head_size, 1 if smollm2.kv_fp8 else 4
        )
        e = LLMEngine(
            smollm2,
            max_seq_len=1024,
            max_batch_size=6,
            max_num_tokens=96,
            kv_cache_bytes=blocks * per_block,
            tokens_per_block=32,
            end_id=-1,
            enable_chunked_context=True,
        )
        return e, record_logits(e)

    rng = random.Random(7)
    reqs = [([rng.randrange(100, 20000) for _ in range(rng.randint(1, 200))], rng.randint(1, 8)) for _ in range(10)]
    alone_engine, ref_logits = engine()
    ref = [alone_engine.generate(p, SamplingParams(n)) for p, n in reqs]
    batched, logits = engine()
    got, _ = run_interleaved(batched, reqs, arrivals=3)
    assert got == ref
    assert_same_bits(logits, ref_logits)
    assert batched.stats()["max_seqs_in_step"] >= 3


def test_failures_end_their_requests_with_an_error_and_free_their_blocks(model, monkeypatch):
    """A failed forward pass fails that step's requests, a failed sampling only its request, a failed step in the
    background loop everything running; the engine keeps serving and every block comes back."""
    import nim_build.runtime.engine as engine_module

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    engine = make_engine(model)
    events = []
    engine.submit([5, 6, 7], SamplingParams(4), events.append)
    with monkeypatch.context() as m:
        m.setattr(model, "forward", boom)
        engine.step()
    assert [(ev.finish_reason, ev.error) for ev in events] == [("error", "RuntimeError: boom")]
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]

    choose = engine_module.choose
    monkeypatch.setattr(engine_module, "choose", lambda x, p, g: boom() if p.seed == 13 else choose(x, p, g))
    good, bad = [], []
    engine.submit([5, 6, 7], SamplingParams(4), good.append)
    engine.submit([8, 9], SamplingParams(4, temperature=1.0, seed=13), bad.append)
    while not (good and good[-1].finished):
        engine.step()
    assert [ev.finish_reason for ev in bad] == ["error"] and good[-1].finish_reason == "length"
    assert sum((ev.token_ids for ev in good), []) == alone(model, [([5, 6, 7], 4)])[0]
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]

    engine.start()
    monkeypatch.setattr(engine, "_run", boom)
    try:
        with pytest.raises(RuntimeError, match="generation failed: RuntimeError: boom"):
            engine.generate([5, 6, 7], SamplingParams(4))
    finally:
        engine.shutdown()
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]


ONE_TEAM_SCRIPT = """
import json, os, sys, threading, time
import torch
from nim_build.runtime import LLMEngine, SamplingParams

def native_threads():  # OS threads that are not Python threads: OpenMP workers
    return len(os.listdir("/proc/self/task")) - threading.active_count()

torch.set_num_threads(2)
base = native_threads()
engine = LLMEngine.from_engine_dir(sys.argv[1], max_batch_size=2)
for _ in range(200):  # the loading thread's workers exit after it, asynchronously
    loaded = native_threads()
    if loaded == base:
        break
    time.sleep(0.05)
engine.generate(list(range(100, 160)), SamplingParams(4))
serving = native_threads()
print(json.dumps([base, loaded, serving]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_loading_leaves_the_step_loop_the_only_openmp_team(reference_engine_dir):
    """libgomp throttles every team once a process has more OpenMP threads than CPUs, which made background steps
    1.7x slower (runtime/threads.py). In a fresh process with 2 torch threads: loading weights and allocating the
    KV pool leave no OpenMP worker behind on the caller's thread; serving adds exactly the loop's one worker."""
    out = subprocess.run(
        [sys.executable, "-c", ONE_TEAM_SCRIPT, str(reference_engine_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    base, loaded, serving = json.loads(out.strip().splitlines()[-1])
    assert (loaded, serving) == (base, base + 1)


def test_on_own_thread_returns_and_raises_like_a_call():
    from nim_build.runtime.threads import on_own_thread

    caller = threading.get_ident()
    assert on_own_thread(lambda a, b=0: (a + b, threading.get_ident() != caller), 2, b=3) == (5, True)
    with pytest.raises(UserError, match="bad"):
        on_own_thread(lambda: (_ for _ in ()).throw(UserError("bad")))


def test_without_chunked_context_prompts_are_computed_in_one_step(model):
    """enable_chunked_context off (TensorRT-LLM's default): a prompt longer than max_num_tokens is refused, and every
    admitted prompt is computed whole in one step; with it on, a prompt that does not fit the step is split."""
    reqs = [([7] * 40, 4), ([9] * 30, 4), ([11] * 20, 4)]
    ref = alone(model, reqs)
    steps = {}
    for chunked in (False, True):
        engine = make_engine(model, enable_chunked_context=chunked)
        out = {}
        for prompt, n in reqs:  # all three arrive together: 90 prompt tokens, 48 per step
            rid = engine.submit(
                prompt, SamplingParams(n), lambda ev, out=out: out.setdefault(ev.request_id, []).extend(ev.token_ids)
            )
        steps[chunked] = []
        while engine.has_work():
            engine.step()
            steps[chunked].append(engine.stats()["last_step_tokens"])
        assert [out[r] for r in sorted(out)] == ref  # the same results either way
        assert rid == 3
    with pytest.raises(UserError, match="longer than max_num_tokens 48, and chunked context is off"):
        make_engine(model, enable_chunked_context=False).submit([5] * 49, SamplingParams(4), lambda ev: None)
    assert steps[False][:2] == [40, 30 + 1]  # the 30-token prompt waits a step rather than being cut
    assert steps[True][:2] == [48, 1 + 22 + 20]  # 40 + the next prompt's first block; a decode, its rest, the third
