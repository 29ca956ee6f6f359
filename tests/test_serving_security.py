"""The serving path under hostile input (issue 12, items 9 and 12), against the real server `nim_build serve` runs.

- Triton 2.51's HTTP frontend died (SIGSEGV) on a body of about 4 MB: serve's guard answers 413 in Triton's
  error shape, Content-Length or chunked, and Triton never sees the body.
- Error responses say what was wrong, never how the server is laid out (no traceback, no path).
- Every token id a client sends is range-checked (a bad-word id of -3 used to mask another token).
"""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from nim_build.serving.client import Client, GenerateRequest


def _post(served, path: str, body: bytes, chunked: bool = False) -> tuple[int, str]:
    host, port = served.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        if chunked:
            conn.putrequest("POST", path)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.putheader("Content-Type", "application/json")
            conn.endheaders()
            step = 1 << 20
            try:
                for i in range(0, len(body), step):
                    piece = body[i : i + step]
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the guard may answer and close before the whole body is sent
        else:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", errors="replace")
    finally:
        conn.close()


def _ready(served) -> bool:
    host, port = served.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.parametrize("size_mb, chunked", [(4, False), (4, True), (64, False)], ids=["4MB", "4MB-chunked", "64MB"])
def test_big_http_bodies_get_413_and_the_server_stays_ready(triton_serve, size_mb, chunked):
    body = json.dumps({"text_input": "x" * (size_mb << 20), "max_tokens": 1}).encode()
    status, text = _post(triton_serve, "/v2/models/ensemble/generate", body, chunked=chunked)
    assert status == 413, text
    assert "larger than this server accepts" in json.loads(text)["error"]
    assert _ready(triton_serve)
    ok = Client(triton_serve.http_url, "http", "ensemble").generate(GenerateRequest(prompt="1, 2, 3,", max_tokens=2))
    assert ok.text


def test_a_body_under_the_limit_passes(triton_serve):
    body = b'{"text_input": "1, 2, 3,",' + b" " * (1 << 20) + b'"max_tokens": 1}'  # 1 MB of JSON whitespace
    status, text = _post(triton_serve, "/v2/models/ensemble/generate", body)
    assert status == 200, text
    assert "text_output" in json.loads(text)


HOSTILE = {
    "deep messages JSON": {"text_input": "", "max_tokens": 4, "messages": "[" * 100000 + "]" * 100000},
    "messages not a list": {"text_input": "", "max_tokens": 4, "messages": '{"messages": 7}'},
    "a message without content": {"text_input": "", "max_tokens": 4, "messages": '[{"role": "user"}]'},
    "max_tokens past max_seq_len": {"text_input": "hi", "max_tokens": 10**9},
}


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_errors_carry_no_traceback_and_no_path(triton_serve, model, case):
    status, text = _post(triton_serve, f"/v2/models/{model}/generate", json.dumps(HOSTILE[case]).encode())
    assert 400 <= status < 500, (status, text)
    error = json.loads(text)["error"]
    for leak in ("Traceback", 'File "', ".py", "/work", "site-packages", str(triton_serve.repo)):
        assert leak not in error, error
    assert _ready(triton_serve)


def _llm(served, inputs: dict, request_id: str = "x"):
    import queue

    import tritonclient.grpc as grpcclient

    tensors = []
    for name, arr in inputs.items():
        t = grpcclient.InferInput(name, list(arr.shape), {np.int32: "INT32", np.bool_: "BOOL"}[arr.dtype.type])
        t.set_data_from_numpy(arr)
        tensors.append(t)
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(served.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        c.async_stream_infer("tensorrt_llm", tensors, request_id=request_id)
        return results.get(timeout=60)
    finally:
        c.stop_stream()
        c.close()


@pytest.mark.parametrize(
    "name, words, match",
    [
        ("bad_words_list", [[[-3], [1]]], "bad_words: token id -3 is outside the vocabulary"),
        ("stop_words_list", [[[10**6], [1]]], "stop_words: token id 1000000 is outside the vocabulary"),
        ("bad_words_list", [[[5, 6], [3, -1]]], "end offsets must increase and be at most 2"),
    ],
)
def test_word_list_ids_are_range_checked(triton_serve, name, words, match):
    inputs = {
        "input_ids": np.array([[5, 6, 7]], dtype=np.int32),
        "input_lengths": np.array([[3]], dtype=np.int32),
        "request_output_len": np.array([[2]], dtype=np.int32),
        name: np.array(words, dtype=np.int32),
    }
    result, error = _llm(triton_serve, inputs)
    assert result is None and match in str(error), str(error)


def test_a_client_leaving_an_http_stream_cancels_its_request(triton_serve):
    """Issue 12, item 7: over HTTP as over gRPC, a client that leaves an ensemble stream has its request
    cancelled; the guard closes its upstream request, and the engine's KV blocks come back."""
    import socket

    host, port = triton_serve.http_url.split(":")
    body = json.dumps({"text_input": "1, 2, 3,", "max_tokens": 480, "min_tokens": 480, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = f"POST /v2/models/ensemble/generate_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert b"data:" in sock.recv(65536) or b"data:" in sock.recv(65536)  # the stream has started
    triton_serve.wait_stats(lambda s: s["active"] >= 1 and s["free_blocks"] < s["total_blocks"])
    sock.close()
    triton_serve.wait_idle()
