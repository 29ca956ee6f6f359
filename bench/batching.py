"""In-flight batching benchmark on the embedded default model (SmolLM2-135M-Instruct), CPU.

Modes, each at several concurrencies (closed loop: `c` clients, each sends its next request when the previous one
finished):
  inflight   the reference runtime's in-flight batching (up to c sequences per step)
  one        one request at a time (max_batch_size 1), the same clients queueing
  static     static batches: c requests start together, the next c only when all of them finished
             (arrival = the batch's start, so static TTFT excludes the wait for the previous batch)
Mixed lengths, chat-like: prompts 16-128 tokens, outputs 16-160 tokens (uniform; fixed per request: the end id is
ignored). On CPU a prompt token costs about as much as a decode step of a whole batch, so prompt-heavy mixes
(--prompt-len 16,256 --output-len 8,96) leave batching less to gain.

    python bench/batching.py [--quant bf16|fp8] [--concurrency 1,4,16,64] [--one-max 16] [--engine DIR]
                             [--prompt-len 16,128] [--output-len 16,160]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nim_build.runtime import DecoderModel, LLMEngine, SamplingParams  # noqa: E402


def checkpoint(quant: str, engine: str | None) -> Path:
    if engine:
        return Path(engine) / "checkpoint"
    from nim_build.builder.calib_data import token_batch
    from nim_build.builder.convert import convert_checkpoint
    from nim_build.builder.default_model import materialize_default_model
    from nim_build.builder.plan import make_plan
    from nim_build.builder.source import open_source

    model_dir = materialize_default_model(REPO / ".cache" / "test-models")
    out = REPO / ".cache" / "bench" / f"smollm2-{quant}-checkpoint"
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        source = open_source(model_dir)
        calib = token_batch(source.tokenizer, 16, 256) if quant == "fp8" else None
        convert_checkpoint(source, out, make_plan(source.spec, 1), quant=quant, calib_ids=calib)
    return out


def workload(n: int, vocab: int, seed: int, prompt_len=(16, 128), output_len=(16, 160)) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(10, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
        for _ in range(n)
    ]


def run(model, mode: str, reqs, c: int) -> dict:
    batch = 1 if mode == "one" else c
    engine = LLMEngine(model, max_seq_len=1024, max_batch_size=batch, max_num_tokens=8192, end_id=-1)
    engine.start()
    timings, queue, lock, done = [], deque(reqs), threading.Lock(), threading.Event()
    counts: dict[int, int] = {}

    def submit_next():
        with lock:
            if not queue:
                return
            prompt, n = queue.popleft()
        engine.submit(prompt, SamplingParams(n, end_id=-1), on_event)

    def on_event(ev):
        counts[ev.request_id] = counts.get(ev.request_id, 0) + len(ev.token_ids)
        if ev.finished:
            timings.append((ev.arrival, ev.first_token, ev.last_token, counts[ev.request_id]))
            if mode != "static":
                submit_next()
            if len(timings) == len(reqs) or (mode == "static" and len(timings) % c == 0):
                done.set()

    t0 = time.monotonic()
    if mode == "static":
        while queue:
            done.clear()
            for _ in range(min(c, len(queue))):
                submit_next()
            done.wait()
            if len(timings) == len(reqs):
                break
    else:
        for _ in range(c):
            submit_next()
        done.wait()
    wall = time.monotonic() - t0
    engine.shutdown()
    ttft = [f - a for a, f, _, _ in timings]
    itl = [(last - f) / (n - 1) for _, f, last, n in timings if n > 1]
    return {
        "requests": len(reqs),
        "tokens": sum(t[3] for t in timings),
        "wall_s": wall,
        "tok_s": sum(t[3] for t in timings) / wall,
        "ttft_mean": statistics.mean(ttft),
        "ttft_p50": statistics.median(ttft),
        "itl_mean": statistics.mean(itl),
        "max_seqs_in_step": engine.stats()["max_seqs_in_step"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", default="bf16", choices=["bf16", "fp8"])
    ap.add_argument("--engine", help="an engine directory instead of the default model")
    ap.add_argument("--concurrency", default="1,4,16,64")
    # Enough requests per client that the final drain (fewer than `c` requests left) is a small part of the run.
    ap.add_argument("--requests-per-client", type=int, default=4, help="requests = max(8, this * concurrency)")
    ap.add_argument("--one-max", type=int, default=16, help="skip one-at-a-time above this concurrency (slow)")
    ap.add_argument(
        "--one-requests",
        type=int,
        default=16,
        help="one-at-a-time runs the workload's first N requests: strictly sequential, its tok/s does not "
        "depend on how many",
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompt-len", default="16,128", help="min,max prompt tokens")
    ap.add_argument("--output-len", default="16,160", help="min,max output tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = DecoderModel.from_checkpoint(checkpoint(args.quant, args.engine))
    engine_name = args.engine or f"SmolLM2-135M-Instruct {args.quant} checkpoint"
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        reqs = workload(
            max(8, args.requests_per_client * c),
            model.cfg.vocab_size,
            args.seed + c,
            tuple(map(int, args.prompt_len.split(","))),
            tuple(map(int, args.output_len.split(","))),
        )
        results = {}
        for mode in ("one", "static", "inflight"):
            if mode == "one" and c > args.one_max:
                continue
            results[mode] = r = run(model, mode, reqs[: args.one_requests] if mode == "one" else reqs, c)
            print(
                f"c={c} {mode}: {r['tok_s']:.1f} tok/s, {r['tokens']} tokens in {r['wall_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        rows.append((c, results))
    print(
        f"\n`python bench/batching.py {' '.join(argv if argv is not None else sys.argv[1:])}` — {engine_name}, "
        f"CPU float32 compute, {args.threads} threads, prompts {args.prompt_len.replace(',', '-')} / outputs "
        f"{args.output_len.replace(',', '-')} tokens\n"
    )
    print(
        "| concurrency | mode | requests | output tok/s | TTFT mean (ms) | TTFT p50 (ms) | ITL mean (ms) | "
        "max seqs/step | vs one-at-a-time | vs static |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, results in rows:
        for mode, r in results.items():
            vs_one = f"{r['tok_s'] / results['one']['tok_s']:.2f}x" if "one" in results else "—"
            vs_static = f"{r['tok_s'] / results['static']['tok_s']:.2f}x"
            print(
                f"| {c} | {mode} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_mean'] * 1e3:.0f} | "
                f"{r['ttft_p50'] * 1e3:.0f} | {r['itl_mean'] * 1e3:.1f} | {r['max_seqs_in_step']} | {vs_one} | "
                f"{vs_static} |"
            )


if __name__ == "__main__":
    main()
