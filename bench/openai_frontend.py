"""The OpenAI API's cost: added latency per request, and streamed tokens per CPU-second of its process.

A real Triton server runs a repository on the trivial engine (nim_build.testing.trivial_engine: no model, one
token per request per in-flight step), and the OpenAI API process (`python -m nim_build.openai`, what serve runs)
sits in front of it. Side by side in one run:

  latency   one-shot requests of 1 token, alternately through the OpenAI API (/v1/completions with the same token
            ids, one keep-alive HTTP connection) and straight to `tensorrt_llm` over gRPC (tritonclient's stream
            API): p50/p99 of each and their difference, what the API adds
  stream    --streams concurrent /v1/chat/completions streams of --tokens tokens, the engine stepping every
            --step-ms (one token per stream per step: one SSE chunk per token): tokens/s delivered and tokens per
            CPU-second of the API process (user + system), which stays meaningful on a busy machine

    python bench/openai_frontend.py [--requests 300] [--streams 32] [--tokens 256] [--step-ms 4] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import TEXT, _server, cpu_s, trivial_engine_dir  # noqa: E402  (bench/serving.py)


def _post(conn: http.client.HTTPConnection, path: str, body: dict) -> dict:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status}: {data[:300]!r}")
    return json.loads(data)


def bench_latency(server, api_port: int, ids: list[int], n: int) -> dict:
    import queue

    import tritonclient.grpc as grpcclient

    def llm_inputs():
        out = []
        for name, arr, dt in (
            ("input_ids", np.array([ids], dtype=np.int32), "INT32"),
            ("input_lengths", np.array([[len(ids)]], dtype=np.int32), "INT32"),
            ("request_output_len", np.array([[1]], dtype=np.int32), "INT32"),
        ):
            x = grpcclient.InferInput(name, list(arr.shape), dt)
            x.set_data_from_numpy(arr)
            out.append(x)
        return out

    results: queue.Queue = queue.Queue()
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    grpc.start_stream(callback=lambda result, error: results.put((result, error)))
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=60)
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0}
    direct, api = [], []
    try:
        for i in range(n + 10):  # alternately, so both see the same machine; the first 10 warm up
            t0 = time.perf_counter()
            grpc.async_stream_infer("tensorrt_llm", llm_inputs(), request_id=f"lat-{i}")
            _, error = results.get(timeout=60)
            if error is not None:
                raise RuntimeError(error)
            t1 = time.perf_counter()
            _post(conn, "/v1/completions", body)
            t2 = time.perf_counter()
            if i >= 10:
                direct.append(t1 - t0)
                api.append(t2 - t1)
    finally:
        grpc.stop_stream()
        grpc.close()
        conn.close()

    def ms(xs, q):
        return 1000 * float(np.percentile(xs, q))

    return {
        "requests": n,
        "tensorrt_llm_grpc_ms": {"p50": ms(direct, 50), "p99": ms(direct, 99)},
        "openai_api_ms": {"p50": ms(api, 50), "p99": ms(api, 99)},
        "added_ms": {"p50": ms(api, 50) - ms(direct, 50), "p99": ms(api, 99) - ms(direct, 99)},
    }


def bench_streams(api_port: int, api_proc: psutil.Process, streams: int, tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": TEXT}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,  # the trivial engine replays the prompt, its end id included
        "stream": True,
    }
    counts = [0] * streams
    errors: list[str] = []

    def one(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=300)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            for line in resp:
                if line.startswith(b"data: {") and b'"content":"' in line:
                    counts[k] += 1
        except Exception as e:
            errors.append(str(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(streams)]
    c0, t0 = cpu_s(api_proc), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, cpu_s(api_proc) - c0
    if errors:
        raise RuntimeError(errors[0])
    chunks = sum(counts)
    return {
        "streams": streams,
        "tokens_per_stream": tokens,
        "content_chunks": chunks,
        "tokens_per_s": streams * tokens / wall,
        "api_cpu_s": cpu,
        "tokens_per_api_cpu_s": streams * tokens / max(cpu, 1e-3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from nim_build.openai.process import OpenAIFrontend
    from nim_build.serving.repo import RepoOptions, generate_repo
    from nim_build.serving.server import free_port
    from nim_build.serving.tokenizer import Tokenizer
    from nim_build.testing.trivial_engine import ENGINE_CLASS as TRIVIAL_ENGINE

    root = Path(tempfile.mkdtemp(prefix="bench_openai_"))
    report: dict = {"machine": {"cpus": psutil.cpu_count(), "load_avg_1m": psutil.getloadavg()[0]}}
    try:
        eng = trivial_engine_dir(root, None)
        ids = Tokenizer.from_engine_dir(eng).encode(TEXT)
        for paced in (False, True):
            (eng / "trivial_engine.json").write_text(json.dumps({"step_delay_s": args.step_ms / 1e3 if paced else 0}))
            repo = generate_repo(eng, root / f"repo-{paced}", RepoOptions(engine_class=TRIVIAL_ENGINE))
            with _server(repo) as server:
                api = OpenAIFrontend(repo, host="127.0.0.1", port=free_port(), grpc_url=server.grpc_url)
                try:
                    api.start().wait_ready(60)
                    if paced:
                        bench_streams(api.port, psutil.Process(api.proc.pid), 4, 16)  # warm up
                        report["stream"] = bench_streams(
                            api.port, psutil.Process(api.proc.pid), args.streams, args.tokens
                        )
                    else:
                        report["latency"] = bench_latency(server, api.port, ids, args.requests)
                finally:
                    api.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, values in report.items():
            print(f"{name}: {json.dumps(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
