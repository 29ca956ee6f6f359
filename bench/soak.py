#!/usr/bin/env python
"""Bounded load test of `nim_build serve` (issue 12; not a test of the suite: it runs minutes; BENCHMARKS.md §7).

    python bench/soak.py [--streams 64] [--seconds 120] [--modes decoupled,non-decoupled] [--max-queue-size 16]

For each repository mode, on the embedded model's FP8 reference engine: `streams` clients send greedy requests
back to back for `seconds` over gRPC (streaming on the decoupled repository, one-shot on the non-decoupled one),
and a quarter of them leave every request early (close their stream after the first response, or after 0.3 s when
one-shot). Checked: every completed response equals the same prompt's text generated alone; serve never restarts
Triton and answers /v2/health/ready throughout; the server tree's RSS in the last minute is not above the first
minute's (by more than 3%); every KV block is back in the pool after the load. Then the load starts again and
serve gets SIGTERM: it must exit 0 within its drain bound with no process and no /dev/shm segment left. A client
whose request failed (refused while serve drains) waits a second before the next, as the SDKs back off: 64
clients retrying at once on these 2 cores slowed the engine to a step every 2 s. The non-decoupled repository bounds
its engine's queue (--max-queue-size): there a client that leaves does not cancel its request (Triton 2.51). serve's
logs stay in --logs.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from nim_build.errors import QUEUE_FULL, TRITON_QUEUE_FULL
from nim_build.serving.server import engine_stats, free_ports, metrics_text

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["1, 2, 3, 4,", "The capital of France is", "def add(a, b):", "Once upon a time", "Hello, my name is"]
MAX_TOKENS = 48
EXIT_TIMEOUT_S = 30
ERROR_KINDS = {"engine_queue_full": QUEUE_FULL, "triton_queue_full": TRITON_QUEUE_FULL}  # the refusals, counted apart


class Serve:
    def __init__(self, repo: Path, log: Path):
        self.http, self.grpc, self.metrics, self.openai = free_ports(4)
        self.log = log
        args = ["--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]
        args += ["--openai-port", str(self.openai), "--exit-timeout", str(EXIT_TIMEOUT_S), "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nim_build", "serve", str(repo), *args],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 240
        while "ready: HTTP" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=10).status == 200
        except OSError:
            return False

    def stats(self) -> dict[str, float]:
        """The engine's running and waiting requests and its KV-cache use (0 to 1), as serve reads them."""
        return engine_stats(metrics_text(f"http://127.0.0.1:{self.metrics}/metrics"))

    def tree_rss(self) -> int:
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running())


def _request(url: str, prompt: str, stream: bool, leave: bool) -> str | None:
    """One request on its own gRPC stream; the text, or None when the client left early."""
    import tritonclient.grpc as grpcclient

    from nim_build.serving.client import grpc_inputs

    body = {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": stream, "exclude_input_in_output": True}
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    finished, pieces = False, []
    try:
        client.async_stream_infer("ensemble", grpc_inputs(body), enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=0.3 if leave and not stream else 120)
            if error is not None:
                raise RuntimeError(str(error))
            out = result.as_numpy("text_output")
            if out is not None:
                pieces += [p.decode() for p in out.reshape(-1)]
            if leave:
                return None
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                finished = True
                return "".join(pieces)
    except queue.Empty:
        return None  # a one-shot client that gave up
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _load(serve: Serve, streams: int, seconds: float, stream: bool, expected: dict, stop: threading.Event) -> dict:
    counts = {"completed": 0, "left": 0, "wrong": 0, "errors": 0}
    lock = threading.Lock()
    errors: list[str] = []

    def client(k: int) -> None:
        leave, i = k % 4 == 0, k
        while not stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            i += 1
            try:
                text = _request(f"127.0.0.1:{serve.grpc}", prompt, stream, leave)
            except Exception as e:  # counted; the client retries after a second, as the SDKs back off
                with lock:
                    counts["errors"] += 1
                    errors.append(str(e)[:200])
                    kind = next((k for k, words in ERROR_KINDS.items() if words in str(e)), "other")
                    counts[f"errors_{kind}"] = counts.get(f"errors_{kind}", 0) + 1
                stop.wait(1.0)
                continue
            with lock:
                if text is None:
                    counts["left"] += 1
                elif text == expected[prompt]:
                    counts["completed"] += 1
                else:
                    counts["wrong"] += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(streams)]
    for t in threads:
        t.start()
    rss, not_ready, t0 = [], 0, time.monotonic()
    while time.monotonic() - t0 < seconds and not stop.is_set():
        time.sleep(5)
        try:
            rss.append((time.monotonic() - t0, serve.tree_rss()))
        except psutil.Error:  # serve is gone (the SIGTERM phase)
            break
        not_ready += not serve.ready()
    stop.set()
    for t in threads:
        t.join(180)
    return {**counts, "not_ready_probes": not_ready, "rss": rss, "errors_seen": errors[:5]}


def soak(mode: str, streams: int, seconds: float, work: Path, logs: Path, max_queue_size: int) -> dict:
    from nim_build.serving.client import Client, GenerateRequest
    from nim_build.serving.repo import RepoOptions, generate_repo

    decoupled = mode == "decoupled"
    opts = RepoOptions(decoupled=decoupled, max_queue_size=0 if decoupled else max_queue_size)
    repo = generate_repo(work / "engine", work / f"repo-{mode}", opts)
    stream = decoupled  # streaming requests on the decoupled repository, one-shot ones on the other
    serve = Serve(repo, logs / f"serve-{mode}.log")
    try:
        c = Client(f"127.0.0.1:{serve.grpc}")
        alone = {p: GenerateRequest(prompt=p, max_tokens=MAX_TOKENS, stream=stream) for p in PROMPTS}
        expected = {p: c.generate(req).text for p, req in alone.items()}
        triton = [p.pid for p in psutil.Process(serve.proc.pid).children() if "tritonserver" in p.name()]
        result = _load(serve, streams, seconds, stream, expected, threading.Event())
        deadline = time.monotonic() + 60
        while (s := serve.stats())["running"] or s["cache"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        result["kv_blocks_back"] = s["cache"] == 0 and s["running"] == 0
        now = [p.pid for p in psutil.Process(serve.proc.pid).children() if "tritonserver" in p.name()]
        result["triton_restarted"] = now != triton
        result["ready_after"] = serve.ready()
        first = [r for t, r in result["rss"] if t <= 60]
        last = [r for t, r in result["rss"] if t > seconds - 60]
        result["rss_first_minute_MiB"] = round(statistics.mean(first) / 2**20)
        result["rss_last_minute_MiB"] = round(statistics.mean(last) / 2**20)
        result["rss_growth"] = round(statistics.mean(last) / statistics.mean(first) - 1, 4)
        del result["rss"]
        # SIGTERM under the same load
        stop = threading.Event()
        loader = threading.Thread(target=_load, args=(serve, streams, 600, stream, expected, stop), daemon=True)
        loader.start()
        time.sleep(10)
        tree = [psutil.Process(serve.proc.pid), *psutil.Process(serve.proc.pid).children(recursive=True)]
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        try:
            code = serve.proc.wait(EXIT_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            code = f"still running {EXIT_TIMEOUT_S + 60} s after SIGTERM (killed)"
        result["sigterm_exit_code"] = code
        result["sigterm_exit_s"] = round(time.monotonic() - t0, 1)
        stop.set()
        loader.join(180)
        time.sleep(1)
        result["processes_left"] = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        result["shm_left"] = [str(p) for p in Path("/dev/shm").glob(f"nimb{serve.proc.pid}s*")]
        result["serve_log_tail"] = serve.log.read_text().strip().splitlines()[-1]
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--modes", default="decoupled,non-decoupled")
    ap.add_argument(
        "--max-queue-size",
        type=int,
        default=16,
        help="tensorrt_llm's max_queue_size on the non-decoupled repository, where a client that leaves does not "
        "cancel its request (0: no bound). The drain must finish the queue within --exit-timeout (30 s here).",
    )
    ap.add_argument("--logs", type=Path, default=REPO / ".cache" / "bench" / "soak-logs", help="serve's logs, kept")
    args = ap.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NIM_BUILD_CACHE", str(REPO / ".cache" / "nim_build"))
    from nim_build.builder.pipeline import build
    from nim_build.options import BuildOptions

    with tempfile.TemporaryDirectory(prefix="nim-soak-") as tmp:
        work = Path(tmp)
        opts = BuildOptions(
            model="default",
            out=str(work / "engine"),
            backend="reference",
            accuracy_gate=False,
            calib_samples=4,
            max_seq_len=512,
            max_batch_size=64,
        )
        build(opts, progress=False)
        for mode in args.modes.split(","):  # each mode's report as soon as it is done
            result = soak(mode, args.streams, args.seconds, work, args.logs, args.max_queue_size)
            print(json.dumps({mode: result}, indent=2), flush=True)


if __name__ == "__main__":
    main()
