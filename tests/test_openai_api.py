"""The OpenAI-compatible API of `nim_build serve`, called with the real `openai` client (PyPI) against the session's
real Triton server on the default model's FP8 reference engine.

Compared with: the Triton ensemble and `nim_build run` (greedy text), the tokenizer's own counts (usage), the
runtime's own log-softmax of its logits, computed here by a separate LLMEngine (log probs), and the engine's
KV-block statistics on Triton's metrics port (disconnects).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def api(triton_serve):
    return openai.OpenAI(base_url=triton_serve.openai_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(reference_engine_dir) -> str:
    return json.loads((reference_engine_dir / "manifest.json").read_text())["name"]


@pytest.fixture(scope="module")
def tok(reference_engine_dir):
    from nim_build.serving.tokenizer import Tokenizer

    return Tokenizer.from_engine_dir(reference_engine_dir)


def _raw(served, method: str, path: str, body: bytes | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(
        served.openai_url.removesuffix("/v1") + path,
        data=body,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        data, status = e.read().decode(), e.code
    try:
        return status, json.loads(data)
    except json.JSONDecodeError:
        return status, data


def test_greedy_chat_equals_the_ensemble_and_nim_build_run(api, model_name, triton_serve, reference_engine_dir, tok):
    from nim_build.serving.client import Client, GenerateRequest

    r = api.chat.completions.create(model=model_name, messages=CHAT, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert text and r.choices[0].message.role == "assistant"
    ensemble = Client(triton_serve.grpc_url).generate(GenerateRequest(messages=CHAT, max_tokens=24, temperature=0))
    assert text == ensemble.text
    run = subprocess.run(
        [sys.executable, "-m", "nim_build", "run", str(reference_engine_dir), "--chat", "--prompt", CHAT[0]["content"]]
        + ["--max-tokens", "24", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["text"] == text
    # usage: the rendered prompt's length, and one completion token per generated id
    assert r.usage.prompt_tokens == len(tok.encode_chat(CHAT))
    generated = r.usage.completion_tokens
    assert generated == len(json.loads(run.stdout)["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + generated
    assert r.choices[0].finish_reason == ("length" if generated == 24 else "stop")


def test_streamed_chat_equals_the_whole_answer_and_usage_comes_when_asked(api, model_name):
    whole = api.chat.completions.create(model=model_name, messages=CHAT, max_tokens=20, temperature=0)
    for include_usage in (True, False):
        kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(
            api.chat.completions.create(
                model=model_name, messages=CHAT, max_tokens=20, temperature=0, stream=True, **kwargs
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [whole.choices[0].finish_reason]
        usage = [c.usage for c in chunks if c.usage is not None]
        if include_usage:
            assert len(usage) == 1 and chunks[-1].usage == whole.usage and not chunks[-1].choices
        else:
            assert not usage


def test_completions_stream_and_echo(api, model_name, tok):
    prompt = "The three primary colors are"
    whole = api.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0)
    assert whole.usage.prompt_tokens == len(tok.encode(prompt))
    streamed = "".join(
        c.choices[0].text
        for c in api.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].text
    echo = api.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == tok.decode(tok.encode(prompt)) + whole.choices[0].text
    # token-id prompts, two of them
    ids = tok.encode(prompt)
    two = api.completions.create(model=model_name, prompt=[ids, ids], max_tokens=12, temperature=0)
    assert [c.text for c in two.choices] == [whole.choices[0].text] * 2


def test_stop_strings_cut_the_text_before_them(api, model_name):
    whole = api.chat.completions.create(model=model_name, messages=CHAT, max_tokens=24, temperature=0)
    text = whole.choices[0].message.content
    word = text.split()[3]  # a word in the middle of the greedy answer
    for stream in (False, True):
        r = api.chat.completions.create(
            model=model_name, messages=CHAT, max_tokens=24, temperature=0, stop=[word, "zzzz"], stream=stream
        )
        if stream:
            chunks = [c for c in r if c.choices]
            got = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            got, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert got == text[: text.index(word)]
        assert finish == "stop"


def test_seed_reproduces_and_n_gives_independent_choices(api, model_name):
    def ask(**kw):
        r = api.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "Write a short poem."}], max_tokens=16, **kw
        )
        return [c.message.content for c in r.choices], r

    a, _ = ask(seed=1234, temperature=1.0)
    b, _ = ask(seed=1234, temperature=1.0)
    assert a == b
    two, r = ask(seed=1234, temperature=1.0, n=2)
    assert len(two) == 2 and [c.index for c in r.choices] == [0, 1]
    assert two[0] == a[0]  # choice k uses seed + k, as TensorRT-LLM's num_return_sequences
    assert two[1] != two[0]
    greedy, _ = ask(temperature=0, n=2)
    assert greedy[0] == greedy[1]


def test_logprobs_are_the_runtimes_log_softmax_of_the_chosen_tokens(api, model_name, reference_engine_dir, tok):
    import threading

    import torch

    from nim_build.runtime import LLMEngine, SamplingParams

    r = api.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    # the same generation in a runtime of this process, its raw logits taken
    engine = LLMEngine.from_engine_dir(reference_engine_dir, max_batch_size=1)
    rows, done = [], threading.Event()

    def collect(ev):
        rows.extend(ev.generation_logits or [])
        if ev.finished:
            done.set()

    try:
        engine.start()
        engine.submit(
            tok.encode_chat(CHAT),
            SamplingParams(max_new_tokens=8, end_id=tok.end_id, return_generation_logits=True),
            collect,
        )
        assert done.wait(120)
    finally:
        engine.shutdown()
    expected = torch.log_softmax(torch.stack(rows).double(), dim=-1)
    for entry, row in zip(entries, expected):
        chosen = int(row.argmax())  # greedy
        assert entry.token == tok.token_text(chosen)[0]
        assert entry.logprob == pytest.approx(float(row[chosen]), abs=1e-4)
        best = row.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token


BAD_CHAT = [
    ("empty messages", {"messages": []}, 400),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("messages not a list", {"messages": "hi"}, 400),
    ("temperature not a number", {"messages": CHAT, "temperature": "hot"}, 400),
    ("max_tokens 0", {"messages": CHAT, "max_tokens": 0}, 400),
    ("max_tokens negative", {"messages": CHAT, "max_tokens": -5}, 400),
    ("max_tokens beyond the context", {"messages": CHAT, "max_tokens": 100000}, 400),
    ("prompt beyond the context", {"messages": [{"role": "user", "content": "word " * 2000}]}, 400),
    ("n 0", {"messages": CHAT, "n": 0}, 400),
    ("n too large", {"messages": CHAT, "n": 1000}, 400),
    ("response_format json", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400),
    ("stream_options without stream", {"messages": CHAT, "stream_options": {"include_usage": True}}, 400),
    (
        "tools the template does not render",
        {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
    ),
    (
        "tool_choice function not an object",
        {"messages": CHAT, "tools": [], "tool_choice": {"type": "function", "function": "f"}},
        400,
    ),
    ("a tool that is not a function", {"messages": CHAT, "tools": [{"type": "function", "function": "f"}]}, 400),
    ("a body over 2 MiB", {"messages": [{"role": "user", "content": "x" * (3 << 20)}]}, 413),
    ("unknown model", {"messages": CHAT, "model": "no-such-model"}, 404),
]


@pytest.mark.parametrize("what,body,status", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_requests_get_openai_errors_and_the_server_stays_ready(triton_serve, what, body, status):
    got, data = _raw(triton_serve, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert got == status, data
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in err["message"] and "/site-packages/" not in err["message"]
    if what == "prompt beyond the context":  # both numbers
        assert re.search(r"the prompt is \d+ tokens; this model's context is 512 tokens", err["message"]), err
    assert _raw(triton_serve, "GET", "/v1/health/ready")[0] == 200


def test_non_json_body_and_unknown_fields(triton_serve, model_name):
    status, data = _raw(triton_serve, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in data["error"]["message"]
    status, data = _raw(triton_serve, "POST", "/v1/chat/completions", b"[" * 100000 + b"]" * 100000)
    assert status == 400 and "not valid JSON" in data["error"]["message"]
    status, data = _raw(triton_serve, "POST", "/tokenize", json.dumps({"messages": []}).encode())
    assert status == 400 and data["error"]["param"] == "messages"
    # fields of newer API versions are ignored, not refused
    body = {"messages": CHAT, "max_tokens": 2, "some_future_field": {"x": 1}, "service_tier": "auto"}
    status, data = _raw(triton_serve, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and data["model"] == model_name


def test_models_health_version_metadata_tokenize(triton_serve, api, model_name, tok):
    assert [m.id for m in api.models.list().data] == [model_name]
    assert api.models.retrieve(model_name).id == model_name
    assert _raw(triton_serve, "GET", "/v1/models/nope")[0] == 404
    assert _raw(triton_serve, "GET", "/v1/health/live")[0] == 200
    assert _raw(triton_serve, "GET", "/v1/health/ready")[0] == 200
    status, version = _raw(triton_serve, "GET", "/v1/version")
    assert status == 200 and version["release"]
    status, meta = _raw(triton_serve, "GET", "/v1/metadata")
    assert status == 200
    assert (meta["backend"], meta["quantization"], meta["max_seq_len"], meta["tensor_parallel_size"]) == (
        "reference",
        "fp8",
        512,
        1,
    )
    assert meta["versions"]["nim_build"]
    status, t = _raw(triton_serve, "POST", "/tokenize", json.dumps({"prompt": "Hello world"}).encode())
    assert status == 200 and t["tokens"] == tok.encode("Hello world") and t["count"] == len(t["tokens"])
    status, t = _raw(triton_serve, "POST", "/tokenize", json.dumps({"messages": CHAT}).encode())
    assert t["tokens"] == tok.encode_chat(CHAT)
    status, d = _raw(triton_serve, "POST", "/detokenize", json.dumps({"tokens": tok.encode("Hello world")}).encode())
    assert status == 200 and d["prompt"] == "Hello world"
    assert _raw(triton_serve, "POST", "/detokenize", json.dumps({"tokens": [10**9]}).encode())[0] == 400


def test_metrics_have_nims_names(triton_serve, api, model_name):
    api.chat.completions.create(model=model_name, messages=CHAT, max_tokens=3, temperature=0)
    status, text = _raw(triton_serve, "GET", "/v1/metrics")
    assert status == 200
    label = f'{{model_name="{model_name}"}}'
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "gpu_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "request_failure_total",
    ):
        assert f"{name}{label}" in text, name
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert f"{name}_count{label}" in text, name
    success = float(text.split(f"request_success_total{label} ")[1].split()[0])
    assert success >= 1


def test_32_concurrent_streams_are_correct_and_independent(triton_serve, model_name):
    prompts = [f"Count from {k} to {k + 5}." for k in range(8)]

    async def main():
        client = openai.AsyncOpenAI(base_url=triton_serve.openai_url, api_key="unused", max_retries=0, timeout=300)

        async def one(p):
            stream = await client.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        alone = [await one(p) for p in prompts]
        together = await asyncio.gather(*[one(prompts[k % 8]) for k in range(32)])
        await client.close()
        return alone, together

    alone, together = asyncio.run(main())
    assert len(set(alone)) > 1
    assert together == [alone[k % 8] for k in range(32)]


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_kv_blocks(triton_serve, model_name, stream):
    import socket

    body = {"model": model_name, "messages": CHAT, "max_tokens": 400, "min_tokens": 400, "stream": stream}
    before = triton_serve.engine_stats()
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", triton_serve.openai_port), timeout=60) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        triton_serve.wait_stats(lambda s: s["active"] >= 1)  # generating
        if stream:
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)
    # the connection is closed: the client left
    stats = triton_serve.wait_idle()
    assert stats["steps"] - before["steps"] < 300  # cancelled: not run to its 400 tokens


def test_penalties_bias_min_tokens_and_ignore_eos_reach_the_engine(api, model_name, tok):
    def ask(**kw):
        kw.setdefault("messages", CHAT)
        r = api.chat.completions.create(model=model_name, max_tokens=24, temperature=0, **kw)
        return r.choices[0]

    plain = ask()
    assert plain.finish_reason == "stop"  # the greedy answer ends before 24 tokens
    repeat = [{"role": "user", "content": "Write the word hello ten times: hello hello hello"}]
    unpenalized = ask(messages=repeat).message.content
    for penalty in ({"presence_penalty": 2}, {"frequency_penalty": 2}, {"extra_body": {"repetition_penalty": 3.0}}):
        assert ask(messages=repeat, **penalty).message.content != unpenalized, penalty
    long = ask(extra_body={"ignore_eos": True})
    assert long.finish_reason == "length" and long.message.content.startswith(plain.message.content)
    assert ask(extra_body={"min_tokens": 24}).finish_reason == "length"
    first = tok.encode(plain.message.content, add_special_tokens=False)[0]
    biased = ask(logit_bias={str(first): -100})  # the greedy first token banned
    assert not biased.message.content.startswith(tok.decode([first]))


def test_not_ready_is_503_in_openais_shape(reference_engine_dir, tmp_path):
    """The API on its own, with no Triton behind it: live, not ready, requests answered 503."""
    from conftest import free_ports

    from nim_build.serving.repo import generate_repo

    repo = generate_repo(reference_engine_dir, tmp_path / "repo")
    (port, dead) = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nim_build.openai", str(repo), "--host", "127.0.0.1", "--port", str(port)]
        + ["--grpc-url", f"127.0.0.1:{dead}", "--health-interval", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    class Served:
        openai_url = f"http://127.0.0.1:{port}/v1"

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, _ = _raw(Served, "GET", "/v1/health/live")
                break
            except urllib.error.URLError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        assert status == 200
        status, data = _raw(Served, "GET", "/v1/health/ready")
        assert status == 503 and data["error"]["type"] == "service_unavailable"
        status, data = _raw(Served, "POST", "/v1/chat/completions", json.dumps({"messages": CHAT}).encode())
        assert status == 503 and "not ready" in data["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
