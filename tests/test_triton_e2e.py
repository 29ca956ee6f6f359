"""End to end against a real Triton server (`nim_build serve`) on the default model's reference engine."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from nim_build.errors import InferenceError
from nim_build.serving.client import Client, GenerateRequest, grpc_inputs

# The reference runtime is batch invariant (nim_build/runtime/model.py): served greedy text equals the text
# generated alone, whatever shares its steps (health probes, concurrent requests).
PROMPTS = ["1, 2, 3, 4,", "A, B, C, D,", "a b c d e f", "one, two, three, four,"]
MAX_TOKENS = 8
ENTRY_POINTS = ("ensemble", "tensorrt_llm_bls")


@pytest.fixture(scope="module")
def reference(triton_serve):
    """What the runtime generates for each prompt (greedy), decoded: what `nim_build run` prints."""
    from nim_build.runtime import LLMEngine, SamplingParams
    from nim_build.serving.tokenizer import Tokenizer

    tok = Tokenizer.from_engine_dir(triton_serve.engine_dir)
    engine = LLMEngine.from_engine_dir(triton_serve.engine_dir, max_batch_size=4)
    try:

        def run(ids, n=MAX_TOKENS):
            return tok.decode(engine.generate(ids, SamplingParams(max_new_tokens=n)))

        texts = {p: run(tok.encode(p)) for p in PROMPTS}
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        texts["chat"] = run(tok.encode_chat(chat))
        texts["chat-to-end"] = run(tok.encode_chat(chat), 40)  # ends on the end id before 40 tokens
    finally:
        engine.shutdown()
    return texts


def client(served, protocol="grpc", model="ensemble"):
    return Client(served.grpc_url if protocol == "grpc" else served.http_url, protocol, model, timeout_s=120)


@pytest.mark.parametrize("model", ENTRY_POINTS)
@pytest.mark.parametrize("protocol,stream", [("grpc", False), ("grpc", True), ("http", False), ("http", True)])
def test_greedy_text_equals_runtime(triton_serve, reference, model, protocol, stream):
    prompt = PROMPTS[0]
    result = client(triton_serve, protocol, model).generate(
        GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, stream=stream)
    )
    assert result.text == reference[prompt]
    assert result.text.strip()
    if stream:
        assert len([c for c in result.chunks if c]) > 1
    else:
        assert len(result.chunks) == 1


@pytest.mark.parametrize("model", ENTRY_POINTS)
def test_tritonclient_stream_api_one_shot(triton_serve, reference, model):
    """Plain tritonclient code: a one-shot request on the gRPC stream API (unary ModelInfer is refused)."""
    import queue

    import tritonclient.grpc as grpcclient

    results = queue.Queue()
    c = grpcclient.InferenceServerClient(triton_serve.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer(
        model, grpc_inputs({"text_input": PROMPTS[1], "max_tokens": MAX_TOKENS, "stream": False}), request_id="tc-1"
    )
    result, error = results.get(timeout=120)
    c.stop_stream()
    c.close()
    assert error is None
    assert result.as_numpy("text_output").reshape(-1)[0].decode() == reference[PROMPTS[1]]


def test_chat_messages(triton_serve, reference):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    for model in ENTRY_POINTS:
        r = client(triton_serve, "grpc", model).generate(GenerateRequest(messages=msgs, max_tokens=MAX_TOKENS))
        assert r.text == reference["chat"]


def test_stream_that_ends_on_end_id(triton_serve, reference):
    """The last response of a stream stopped by the end id carries no token: every path handles it."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert len(reference["chat-to-end"]) < len(reference["chat"]) * 5  # it did stop early
    for model in ENTRY_POINTS:
        for protocol in ("grpc", "http"):
            r = client(triton_serve, protocol, model).generate(
                GenerateRequest(messages=msgs, max_tokens=40, stream=True)
            )
            assert r.text == reference["chat-to-end"], (model, protocol)


def test_32_concurrent_streams_in_flight(triton_serve, reference):
    before = triton_serve.engine_stats().get("max_seqs_in_step", 0)
    jobs = [(PROMPTS[i % len(PROMPTS)], ENTRY_POINTS[i % 2]) for i in range(32)]
    start = threading.Barrier(len(jobs))

    def one(job):
        prompt, model = job
        start.wait()
        return client(triton_serve, "grpc", model).generate(
            GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, stream=True)
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    for (prompt, _), r in zip(jobs, results):
        assert r.text == reference[prompt]
    assert len({r.request_id for r in results}) == 32
    stats = triton_serve.engine_stats()
    assert stats["max_seqs_in_step"] > 1, stats  # in-flight batching: several sequences per step
    assert stats["max_seqs_in_step"] >= before
    assert "in-flight batch reached" in triton_serve.output()


BAD_REQUESTS = {
    "empty text": ({"text_input": "", "max_tokens": 4}, "empty"),
    "max_tokens 0": ({"text_input": "hi", "max_tokens": 0}, "max_tokens"),
    "max_tokens negative": ({"text_input": "hi", "max_tokens": -5}, "max_tokens"),
    "max_tokens above the limit": ({"text_input": "hi", "max_tokens": 100000}, "max_seq_len"),
    "prompt longer than max_seq_len": ({"text_input": "word " * 700, "max_tokens": 4}, "max_seq_len"),
    "invalid UTF-8": ({"text_input": b"caf\xe9 \xff", "max_tokens": 4}, "UTF-8"),
    "missing required input": ({"text_input": "hi"}, "max_tokens"),
    "bad messages JSON": ({"text_input": "", "messages": "[{", "max_tokens": 4}, "JSON"),
}


def _raw_grpc(served, model, body, dtypes=None, request_id="bad"):
    import queue

    import tritonclient.grpc as grpcclient

    inputs = grpc_inputs(body)
    for name, (dtype, value) in (dtypes or {}).items():
        arr = np.array([[value]], dtype=dtype[1])
        inp = grpcclient.InferInput(name, list(arr.shape), dtype[0])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    results = queue.Queue()
    c = grpcclient.InferenceServerClient(served.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        c.async_stream_infer(model, inputs, request_id=request_id)
        return results.get(timeout=60)
    finally:
        c.stop_stream()
        c.close()


@pytest.mark.parametrize("model", ENTRY_POINTS)
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_then_good(triton_serve, reference, model, case):
    body, expect = BAD_REQUESTS[case]
    result, error = _raw_grpc(triton_serve, model, body)
    assert error is not None and result is None
    assert expect.lower() in str(error).lower(), str(error)
    ok = client(triton_serve, "grpc", model).generate(GenerateRequest(prompt=PROMPTS[2], max_tokens=2))
    assert ok.text and reference[PROMPTS[2]].startswith(ok.text)


def test_wrong_datatype_and_unknown_model(triton_serve, reference):
    result, error = _raw_grpc(
        triton_serve, "ensemble", {"text_input": "hi"}, dtypes={"max_tokens": (("FP32", np.float32), 4.0)}
    )
    assert error is not None and "data-type" in str(error).lower() + "datatype", str(error)
    with pytest.raises(InferenceError, match="(?i)unknown model|not found"):
        Client(triton_serve.grpc_url, "grpc", "no_such_model").generate(GenerateRequest(prompt="hi", max_tokens=2))
    with pytest.raises(InferenceError, match="max_tokens"):
        client(triton_serve, "http").generate(GenerateRequest(prompt="hi", max_tokens=0))
    with pytest.raises(InferenceError, match="(?i)unknown model|not found"):
        Client(triton_serve.http_url, "http", "no_such_model").generate(GenerateRequest(prompt="hi", max_tokens=2))
    ok = client(triton_serve, "http").generate(GenerateRequest(prompt=PROMPTS[3], max_tokens=MAX_TOKENS))
    assert ok.text == reference[PROMPTS[3]]
    import urllib.request

    assert urllib.request.urlopen(f"http://{triton_serve.http_url}/v2/health/ready").status == 200


def _start_long_stream(served, model, request_id):
    import queue

    import tritonclient.grpc as grpcclient

    results = queue.Queue()
    c = grpcclient.InferenceServerClient(served.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer(
        model, grpc_inputs({"text_input": PROMPTS[0], "max_tokens": 480, "stream": True}), request_id=request_id
    )
    result, error = results.get(timeout=60)
    assert error is None
    served.wait_stats(lambda s: s["active"] >= 1 and s["free_blocks"] < s["total_blocks"])
    return c


@pytest.mark.parametrize("model", ENTRY_POINTS)
def test_disconnect_mid_stream_cancels(triton_serve, reference, model):
    """The client goes away mid-stream and its tensorrt_llm request stops: the KV blocks come back. BLS sees the
    cancellation itself; in the ensemble, postprocessing gets the next step marked cancelled and sends `stop`."""
    c = _start_long_stream(triton_serve, model, f"gone-{model}")
    c.stop_stream(cancel_requests=True)  # the client goes away mid-stream
    c.close()
    triton_serve.wait_idle()
    ok = client(triton_serve, "grpc", model).generate(GenerateRequest(prompt=PROMPTS[2], max_tokens=MAX_TOKENS))
    assert ok.text == reference[PROMPTS[2]]


@pytest.mark.parametrize("model", ENTRY_POINTS)
def test_a_foreign_stop_leaves_another_clients_stream_intact(triton_serve, model):
    """Issue 12, item 11: a `stop` request to the exposed tensorrt_llm with the victim's request id used to cut
    the victim's ensemble stream short. The ensemble's streams now answer only to their private stream key (and
    the BLS calls tensorrt_llm with random ids): the victim gets its whole stream, the same text as alone."""
    import queue

    import tritonclient.grpc as grpcclient

    body = {"text_input": PROMPTS[0], "max_tokens": 24}
    alone = client(triton_serve, "grpc", model).generate(GenerateRequest(prompt=PROMPTS[0], max_tokens=24)).text
    results = queue.Queue()
    c = grpcclient.InferenceServerClient(triton_serve.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer(model, grpc_inputs({**body, "stream": True}), request_id="victim")
    pieces = [results.get(timeout=60)]
    _, error = _raw_grpc(
        triton_serve,
        "tensorrt_llm",
        {},
        request_id="victim",
        dtypes={
            "input_lengths": (("INT32", np.int32), 0),
            "request_output_len": (("INT32", np.int32), 0),
            "stop": (("BOOL", np.bool_), True),
        },
    )
    assert error is None  # the stop request itself succeeds (upstream: one empty response)
    c.stop_stream()  # waits for the stream's end
    c.close()
    while not results.empty():
        pieces.append(results.get())
    assert all(err is None for _, err in pieces)
    text = "".join(r.as_numpy("text_output")[0].decode() for r, _ in pieces if r.as_numpy("text_output") is not None)
    assert text == alone


def test_infer_cli_equals_run_cli(triton_serve, reference):
    """`nim_build infer` through the server prints what `nim_build run` prints locally (greedy)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "nim_build",
            "run",
            str(triton_serve.engine_dir),
            "--prompt",
            PROMPTS[0],
            "--max-tokens",
            str(MAX_TOKENS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    base = [sys.executable, "-m", "nim_build", "infer", "--url", triton_serve.grpc_url]
    out = subprocess.run(
        base + ["--prompt", PROMPTS[0], "--max-tokens", str(MAX_TOKENS), "--stream"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == run.stdout == reference[PROMPTS[0]] + "\n"
    out = subprocess.run(
        base + ["--prompt", PROMPTS[0], "--max-tokens", str(MAX_TOKENS), "--json", "--model", "tensorrt_llm_bls"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text_output"] == reference[PROMPTS[0]]
    out = subprocess.run(base + ["--prompt", "hi", "--max-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("Error:") and len(out.stderr.strip().splitlines()) == 1


def test_postprocessing_streams_split_characters_exactly(triton_serve):
    """The server's postprocessing keeps a stream's detokenizer per request id: one token per response, with
    characters split across tokens (CJK, Korean, Arabic, emoji, tabs), still concatenates to the one-shot decode
    and no piece carries a broken character."""
    import tritonclient.grpc as grpcclient

    from nim_build.serving.tokenizer import Tokenizer

    tok = Tokenizer.from_engine_dir(triton_serve.engine_dir)
    text = "北京大学 한국어 مرحبا 🙂👍🏽\tdef f(x):\n\treturn x"
    ids = tok.encode(text, add_special_tokens=False)
    c = grpcclient.InferenceServerClient(triton_serve.grpc_url)
    pieces = []
    try:
        for i in ids:
            t = grpcclient.InferInput("TOKENS_BATCH", [1, 1, 1], "INT32")
            t.set_data_from_numpy(np.array([[[i]]], dtype=np.int32))
            n = grpcclient.InferInput("SEQUENCE_LENGTH", [1, 1], "INT32")
            n.set_data_from_numpy(np.array([[1]], dtype=np.int32))
            out = c.infer("postprocessing", [t, n], request_id="split-chars").as_numpy("OUTPUT")
            pieces.append(out.reshape(-1)[0].decode("utf-8"))
    finally:
        c.close()
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") > 0  # partial characters were held back


def test_client_that_gives_up_on_a_one_shot_ensemble_request(triton_serve, reference):
    """Triton 2.51 forwards no cancellation into an ensemble and a one-shot request has no postprocessing step
    before its end, so the engine finishes it (as under the TensorRT-LLM backend): bounded by max_tokens, its
    blocks come back, and the server keeps answering."""
    impatient = Client(triton_serve.grpc_url, "grpc", "ensemble", timeout_s=0.3)
    with pytest.raises(InferenceError, match="no response"):
        impatient.generate(GenerateRequest(prompt=PROMPTS[0], max_tokens=96, stream=False))
    triton_serve.wait_idle(timeout_s=60)
    ok = client(triton_serve, "grpc").generate(GenerateRequest(prompt=PROMPTS[2], max_tokens=MAX_TOKENS))
    assert ok.text == reference[PROMPTS[2]]


@pytest.mark.parametrize("model", ENTRY_POINTS)
def test_stop_and_bad_words_and_sampling(triton_serve, reference, model):
    c = client(triton_serve, "grpc", model)
    full = reference[PROMPTS[0]]  # " 5, 6, 7, 8,"
    stopped = c.generate(GenerateRequest(prompt=PROMPTS[0], max_tokens=MAX_TOKENS, stop=["7"]))
    assert stopped.text == full[: full.index("7") + 1]  # the stop word is output, as upstream
    banned = c.generate(GenerateRequest(prompt=PROMPTS[0], max_tokens=3, bad_words=["5"]))
    assert "5" not in banned.text
    if model == "ensemble":
        sampled = [
            c.generate(
                GenerateRequest(prompt=PROMPTS[2], max_tokens=4, temperature=1.0, top_k=50, top_p=0.9, seed=7)
            ).text
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1]
