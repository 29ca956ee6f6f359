"""`nim_build run ENGINE --prompt TEXT`: generate locally with the reference runtime, no server."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from nim_build import COMPUTE_DTYPE_ENV, limits
from nim_build.cli._options import compute_dtype_option
from nim_build.errors import NimBuildError


@click.command("run")
@click.argument("engine", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the model's chat template.")
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Most tokens to generate."
)
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (reproducible output).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: the CPUs this process may use].")
@compute_dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print text, token ids, finish reason and timings as JSON.")
def command(
    engine, prompt, chat, max_tokens, stream, temperature, top_k, top_p, seed, device, threads, compute_dtype, as_json
):
    """Generate text for PROMPT with the engine directory ENGINE (its checkpoint/ and tokenizer/)."""
    from nim_build.runtime import LLMEngine, SamplingParams
    from nim_build.serving.tokenizer import Tokenizer

    if threads:
        os.environ[limits.THREADS_ENV] = str(threads)  # read where the model loads
    os.environ[COMPUTE_DTYPE_ENV] = compute_dtype
    tok = Tokenizer.from_engine_dir(engine)
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    llm = LLMEngine.from_engine_dir(engine, device=device, max_batch_size=1)
    params = SamplingParams(max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    decoder = tok.stream_decoder()
    out: list[int] = []
    final: list = []

    def on_event(ev):
        out.extend(ev.token_ids)
        if stream and not as_json:
            piece = decoder.step(ev.token_ids) + (decoder.flush() if ev.finished else "")
            sys.stdout.write(piece)
            sys.stdout.flush()
        if ev.finished:
            final.append(ev)

    t0 = time.monotonic()
    llm.submit(ids, params, on_event)
    while not final:
        llm.step()
    ev = final[0]
    if ev.finish_reason == "error":
        raise NimBuildError(f"generation failed: {ev.error}")  # a fault of the runtime, not of the input
    text = tok.decode(out)
    if as_json:
        first = None if ev.first_token is None else ev.first_token - ev.arrival
        total = time.monotonic() - t0
        click.echo(
            json.dumps(
                {
                    "text": text,
                    "prompt_tokens": len(ids),
                    "token_ids": out,
                    "completion_tokens": len(out),
                    "finish_reason": ev.finish_reason,
                    "ttft_s": first,
                    "total_s": total,
                    "tokens_per_s": len(out) / total if total > 0 else None,
                },
                ensure_ascii=False,
                indent=2,
            )
        )
    elif stream:
        click.echo()
    else:
        click.echo(text)
