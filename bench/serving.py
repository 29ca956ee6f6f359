"""Serving-path benchmark: what preprocessing and postprocessing sustain per instance, and the ensemble's overhead.

A real Triton server runs the generated repository with a trivial engine (nim_build.testing.trivial_engine: no
model, one token per request per in-flight step), so what is measured is the Triton models around the engine.
Throughput is reported per CPU-second of the model itself, i.e. tokens/s per core, which stays meaningful on a
busy machine: a python model's stub process, or the thread that runs the native postprocessing inside
tritonserver (named nim_detokenize); "with_server" adds the tritonserver process. Wall-clock rates are printed too.
Every measurement runs for the native postprocessing and for the python one, side by side.

    python bench/serving.py [--engine-dir DIR] [--requests 400] [--concurrency 16] [--streams 32] [--step-ms 4]
                            [--postprocessing native,python] [--json]

Measures:
  library         nim_build.serving.tokenizer alone: encode and one-token-at-a-time streaming decode, per CPU-second
  preprocessing   prompt tokens encoded per CPU-second (multilingual ~300-token prompts, unary gRPC)
  postprocessing  streamed tokens detokenized per CPU-second, stateful streaming detokenization, responses of
                  1 token (every step of a stream) and of 16 tokens (non-streaming-sized)
  ensemble        32 streams through the whole ensemble, the engine stepping every 4 ms (one token per
                  stream per step, 8k tokens/s offered; --streams, --step-ms): tokens/s delivered, pre+post and
                  post alone tokens per CPU-second, and per CPU-second of the whole server (all processes)
  latency         one-shot request latency p50/p99 through `ensemble` vs `tensorrt_llm` directly (same ids);
                  the difference is what preprocessing + postprocessing + ensemble scheduling add
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

STEP_DELAY_S = 0.004  # the trivial engine's step time: 250 steps/s, one token per stream per step
TEXT = (
    "The quick brown fox jumps over the lazy dog. 中文分词测试：我们今天去北京大学参观。 "
    "한국어 텍스트입니다, 안녕하세요! مرحبا بالعالم، هذا نص عربي. Emoji 🙂👍🏽 and code:\n\tdef f(x): return x * 2\n"
)


def trivial_engine_dir(root: Path, source: Path | None) -> Path:
    """An engine directory for the trivial engine: a manifest and the tokenizer (of `source` or the default model)."""
    from nim_build.builder.manifest import load_manifest
    from nim_build.testing.trivial_engine import write_engine_dir

    eng = root / "trivial-engine"
    if source is not None:
        manifest = load_manifest(source)
        return write_engine_dir(
            eng,
            source / manifest["tokenizer"].get("dir", "tokenizer"),
            manifest["tokenizer"],
            manifest["spec"]["vocab_size"],
        )
    from nim_build.builder.default_model import materialize_default_model

    model = materialize_default_model()
    tok_dir = root / "default-tokenizer"
    tok_dir.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (model / name).is_file():
            shutil.copy(model / name, tok_dir / name)
    tok = {"kind": "hf", "bos_id": 1, "end_id": 2, "pad_id": 2, "chat_template": True}
    return write_engine_dir(eng, tok_dir, tok, json.loads((model / "config.json").read_text())["vocab_size"])


def stub_of(server, model: str) -> psutil.Process:
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        if "triton_python_backend_stub" in p.name() and any(f"/{model}/" in a for a in p.cmdline()):
            return p
    raise RuntimeError(f"no stub process for {model}")


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _run_time(task: Path) -> float:
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # a thread that just ended


class CpuMeter:
    """CPU seconds of one model so far, and of the model together with the tritonserver process (`total`).

    A python model's own time is its stub process's CPU (/proc/.../schedstat: nanoseconds; psutil counts 10 ms
    ticks). The native postprocessing runs on a tritonserver thread (named nim_detokenize), which also runs
    Triton's own path for each response it sends (the ensemble's next step, the gRPC stream): its own time is
    Triton's `compute_infer` statistic, which detokenizer.cc ends before sending; `thread` is the whole thread.
    """

    def __init__(self, server, model: str):
        self.server, self.model, self.url = psutil.Process(server.proc.pid), model, server.grpc_url
        try:
            self.stub = stub_of(server, model)
        except RuntimeError:
            self.stub = None

    def own(self) -> float:
        if self.stub is not None:
            return sum(_run_time(task) for task in Path(f"/proc/{self.stub.pid}/task").iterdir())
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.url) as c:
            stats = c.get_inference_statistics(self.model, as_json=True)["model_stats"][0]["inference_stats"]
        return int(stats.get("compute_infer", {}).get("ns", 0)) / 1e9

    def thread(self) -> float:
        if self.stub is not None:
            return self.own()
        for task in Path(f"/proc/{self.server.pid}/task").iterdir():
            if (task / "comm").read_text().strip() == "nim_detokenize":
                return _run_time(task)
        return 0.0  # no request has run yet

    def total(self) -> float:
        return cpu_s(self.server) + (cpu_s(self.stub) if self.stub is not None else 0.0)


def unary_many(url, model, make_inputs, n, concurrency, request_id=None):
    """n unary gRPC requests, `concurrency` in flight; returns wall seconds."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for _ in range(concurrency)]

    def worker(k):
        c = clients[k]
        for i in range(k, n, concurrency):
            c.infer(model, make_inputs(i), request_id=request_id(i) if request_id else "")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return wall


def bench_library(tok):
    """The tokenizer module alone, one thread: encode, and streaming decode one token at a time."""
    text = TEXT * 200
    t0 = time.process_time()
    ids = tok.encode(text)
    enc = len(ids) / (time.process_time() - t0)
    dec = tok.stream_decoder()
    t0 = time.process_time()
    out = "".join(dec.step([i]) for i in ids) + dec.flush()
    stream = len(ids) / (time.process_time() - t0)
    assert out == tok.decode(ids)
    return {"tokens": len(ids), "encode_tokens_per_cpu_s": enc, "stream_decode_tokens_per_cpu_s": stream}


def bench_preprocessing(server, tok, n, concurrency):
    import tritonclient.grpc as grpcclient

    prompt = TEXT * 3
    n_tokens = len(tok.encode(prompt))

    def inputs(_):
        q = grpcclient.InferInput("QUERY", [1, 1], "BYTES")
        q.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
        m = grpcclient.InferInput("REQUEST_OUTPUT_LEN", [1, 1], "INT32")
        m.set_data_from_numpy(np.array([[16]], dtype=np.int32))
        return [q, m]

    meter = CpuMeter(server, "preprocessing")
    c0, t0 = meter.own(), meter.total()
    wall = unary_many(server.grpc_url, "preprocessing", inputs, n, concurrency)
    cpu = max(meter.own() - c0, 1e-6)
    both = max(meter.total() - t0, 1e-3)
    return {
        "requests": n,
        "tokens_per_request": n_tokens,
        "tokens_per_s_wall": n * n_tokens / wall,
        "tokens_per_cpu_s": n * n_tokens / cpu,
        "tokens_per_cpu_s_with_server": n * n_tokens / both,
        "requests_per_cpu_s": n / cpu,
    }


def bench_postprocessing(server, tok, n, concurrency, chunk):
    """Streams of `chunk`-token responses with request ids (the ensemble's streaming path)."""
    import tritonclient.grpc as grpcclient

    ids = tok.encode(TEXT * 40, add_special_tokens=False)
    streams = concurrency

    def inputs(i):
        k = i // streams
        start = (k * chunk) % (len(ids) - chunk)
        toks = np.array([[ids[start : start + chunk]]], dtype=np.int32)
        t = grpcclient.InferInput("TOKENS_BATCH", list(toks.shape), "INT32")
        t.set_data_from_numpy(toks)
        ln = grpcclient.InferInput("SEQUENCE_LENGTH", [1, 1], "INT32")
        ln.set_data_from_numpy(np.array([[chunk]], dtype=np.int32))
        return [t, ln]

    meter = CpuMeter(server, "postprocessing")
    c0, h0, t0 = meter.own(), meter.thread(), meter.total()
    wall = unary_many(
        server.grpc_url, "postprocessing", inputs, n, concurrency, request_id=lambda i: f"bench-{chunk}-{i % streams}"
    )
    tokens = n * chunk
    return {
        "requests": n,
        "tokens_per_response": chunk,
        "tokens_per_s_wall": tokens / wall,
        "tokens_per_cpu_s": tokens / max(meter.own() - c0, 1e-6),
        "tokens_per_thread_cpu_s": tokens / max(meter.thread() - h0, 1e-6),
        "tokens_per_cpu_s_with_server": tokens / max(meter.total() - t0, 1e-3),
    }


def bench_ensemble_stream(server, n_streams, max_tokens):
    """Streaming through the ensemble; the paced engine steps every --step-ms, so responses carry one token unless
    the tensorrt_llm model falls behind and merges them."""
    from nim_build.serving.client import Client, GenerateRequest

    pre, post, llm = (CpuMeter(server, m) for m in ("preprocessing", "postprocessing", "tensorrt_llm"))
    everything = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    c0, l0, p0, h0 = pre.own() + post.own(), llm.own(), post.own(), post.thread()
    e0 = sum(cpu_s(p) for p in everything)
    t0 = time.perf_counter()

    def one(_):
        r = Client(server.grpc_url, "grpc", "ensemble").generate(
            GenerateRequest(prompt=TEXT, max_tokens=max_tokens, stream=True)
        )
        return len(r.chunks)

    with ThreadPoolExecutor(n_streams) as pool:
        chunks = sum(pool.map(one, range(n_streams)))
    wall = time.perf_counter() - t0
    cpu = pre.own() + post.own() - c0
    tokens = n_streams * max_tokens
    return {
        "streams": n_streams,
        "max_tokens": max_tokens,
        "responses": chunks,
        "tokens_per_s_wall": tokens / wall,
        "pre_post_tokens_per_cpu_s": tokens / max(cpu, 1e-3),
        "post_tokens_per_cpu_s": tokens / max(post.own() - p0, 1e-3),
        "post_tokens_per_thread_cpu_s": tokens / max(post.thread() - h0, 1e-3),
        "tensorrt_llm_stub_tokens_per_cpu_s": tokens / max(llm.own() - l0, 1e-3),
        "server_tokens_per_cpu_s": tokens / max(sum(cpu_s(p) for p in everything) - e0, 1e-3),
    }


def _stream_latency(url, model, inputs, n):
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        c.async_stream_infer(model, inputs(), request_id=f"lat-{model}-{i}")
        result, error = results.get(timeout=60)
        if error is not None:
            raise RuntimeError(error)
        lat.append(time.perf_counter() - t0)
    c.stop_stream()
    c.close()
    return lat


def bench_latency(server, tok, n, max_tokens):
    import tritonclient.grpc as grpcclient

    from nim_build.serving.client import grpc_inputs

    ids = tok.encode(TEXT)

    def llm_inputs():
        out = []
        for name, arr, dt in (
            ("input_ids", np.array([ids], dtype=np.int32), "INT32"),
            ("input_lengths", np.array([[len(ids)]], dtype=np.int32), "INT32"),
            ("request_output_len", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        ):
            x = grpcclient.InferInput(name, list(arr.shape), dt)
            x.set_data_from_numpy(arr)
            out.append(x)
        return out

    def ens_inputs():
        return grpc_inputs({"text_input": TEXT, "max_tokens": max_tokens, "stream": False})

    direct = _stream_latency(server.grpc_url, "tensorrt_llm", llm_inputs, n)
    ens = _stream_latency(server.grpc_url, "ensemble", ens_inputs, n)

    def pct(xs, q):
        return 1000 * float(np.percentile(xs, q))

    return {
        "requests": n,
        "max_tokens": max_tokens,
        "tensorrt_llm_ms": {"p50": pct(direct, 50), "p99": pct(direct, 99)},
        "ensemble_ms": {"p50": pct(ens, 50), "p99": pct(ens, 99)},
        "added_ms": {"p50": pct(ens, 50) - pct(direct, 50), "p99": pct(ens, 99) - pct(direct, 99)},
        "mean_added_ms": 1000 * (statistics.mean(ens) - statistics.mean(direct)),
    }


def _server(repo):
    import socket

    from nim_build.serving.server import TritonServer

    ports = []
    socks = [socket.socket() for _ in range(3)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
        ports.append(sock.getsockname()[1])
    for sock in socks:
        sock.close()
    return TritonServer(
        repo, host="127.0.0.1", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], exit_timeout_s=3
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-dir", type=Path, help="take the tokenizer from this engine [default: the default model]")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--streams", type=int, default=32, help="ensemble streams of the paced run")
    ap.add_argument("--step-ms", type=float, default=STEP_DELAY_S * 1e3, help="the paced trivial engine's step time")
    ap.add_argument("--postprocessing", default="native,python", help="postprocessing kinds to measure, in order")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from nim_build.serving.repo import RepoOptions, generate_repo
    from nim_build.serving.tokenizer import Tokenizer
    from nim_build.testing.trivial_engine import ENGINE_CLASS as TRIVIAL_ENGINE

    root = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    try:
        eng = trivial_engine_dir(root, args.engine_dir)
        tok = Tokenizer.from_engine_dir(eng)
        report = {
            "machine": {"cpus": psutil.cpu_count(), "load_avg_1m": psutil.getloadavg()[0]},
            "library": bench_library(tok),
        }
        # Unpaced engine: per-model costs and the ensemble's added latency. Paced engine: streaming.
        for post in args.postprocessing.split(","):
            for paced in (False, True):
                step_s = args.step_ms / 1e3 if paced else 0.0
                (eng / "trivial_engine.json").write_text(json.dumps({"step_delay_s": step_s}))
                repo = generate_repo(
                    eng,
                    root / f"repo-{post}-{paced}",
                    RepoOptions(engine_class=TRIVIAL_ENGINE, postprocessing=post),
                )
                with _server(repo) as server:
                    try:
                        if paced:
                            bench_ensemble_stream(server, 4, 8)  # warm up (names the native thread)
                            report[f"ensemble_stream[{post}]"] = bench_ensemble_stream(server, args.streams, 128)
                            continue
                        bench_preprocessing(server, tok, 20, 2)  # warm up
                        bench_postprocessing(server, tok, 20, 2, 1)
                        if post == args.postprocessing.split(",")[0]:  # the same python model either way
                            report["preprocessing"] = bench_preprocessing(server, tok, args.requests, args.concurrency)
                        report[f"postprocessing_stream_1[{post}]"] = bench_postprocessing(
                            server, tok, args.requests * 8, args.concurrency, 1
                        )
                        report[f"postprocessing_16[{post}]"] = bench_postprocessing(
                            server, tok, args.requests, args.concurrency, 16
                        )
                        report[f"latency[{post}]"] = bench_latency(server, tok, max(50, args.requests // 4), 16)
                    except Exception:
                        print(server.logs(60), file=sys.stderr)
                        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, values in report.items():
            print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    return 0


def _fmt(v):
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
