"""Serving a real engine end to end on CPU: Triton 2.51, the generated repository, the reference runtime.

Closed-loop clients stream requests through `ensemble` over gRPC (what `nim_build infer --stream` does): prompts of
16-100 words, outputs of 32-95 tokens. Reports output tokens/s (the streamed text re-encoded with the engine's
tokenizer), responses/s and time to first chunk. The default engine is the embedded model, bf16, reference backend.

    python bench/serving_engine.py [--engine DIR] [--concurrency 16] [--requests 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

WORDS = "the of and to in is was for on that with as by at from his her an are this which city river".split()


def default_engine() -> Path:
    out = REPO / ".cache" / "bench" / "smollm2-bf16-reference-engine"
    if not (out / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "nim_build",
                "engine",
                "default",
                "--out",
                str(out),
                "--backend",
                "reference",
                "--quant",
                "bf16",
                "--no-accuracy-gate",
                "--max-seq-len",
                "1024",
                "--force",
            ],
            check=True,
        )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, help="an engine directory [default: the embedded model, bf16]")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args(argv)

    from serving import _server

    from nim_build.serving.client import Client, GenerateRequest
    from nim_build.serving.repo import generate_repo
    from nim_build.serving.tokenizer import Tokenizer

    engine = args.engine or default_engine()
    tok = Tokenizer.from_engine_dir(engine)
    rng = random.Random(0)
    work = [
        (" ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 100))), rng.randint(32, 95))
        for _ in range(args.requests)
    ]
    with tempfile.TemporaryDirectory(prefix="bench_serving_engine_") as tmp:
        repo = generate_repo(engine, Path(tmp) / "repo")
        with _server(repo) as server:

            def one(i):
                prompt, n = work[i]
                r = Client(server.grpc_url, "grpc", "ensemble").generate(
                    GenerateRequest(prompt=prompt, max_tokens=n, stream=True)
                )
                return len(tok.encode(r.text, add_special_tokens=False)), len(r.chunks), r.time_to_first_chunk_s

            one(0)  # warm up
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t0
    tokens, responses = sum(r[0] for r in results), sum(r[1] for r in results)
    ttft = [r[2] for r in results if r[2] is not None]
    print(
        f"{engine.name}: {args.requests} requests at concurrency {args.concurrency} in {wall:.1f} s: "
        f"{tokens / wall:.1f} output tok/s, {responses / wall:.1f} responses/s, time to first chunk mean "
        f"{1e3 * statistics.mean(ttft):.0f} ms, p50 {1e3 * statistics.median(ttft):.0f} ms"
    )


if __name__ == "__main__":
    main()
