"""`nim_build infer`: one generation request to a served repository (gRPC stream API or HTTP generate)."""

from __future__ import annotations

import json
import sys

import click

from nim_build.errors import UserError


@click.command("infer")
@click.option("--url", help="HOST:PORT of Triton [default: localhost:8001 for grpc, localhost:8000 for http].")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--model", default="ensemble", show_default=True, help="ensemble or tensorrt_llm_bls.")
@click.option("--prompt", help="Plain text prompt.")
@click.option(
    "--messages",
    "messages_file",
    type=click.File("r"),
    help='Chat request JSON: a list of messages, or {"messages": [...], "tools": [...]} (\'-\' for stdin).',
)
@click.option("--chat", is_flag=True, help="Send --prompt as a user message, rendered with the chat template.")
@click.option("--stream", is_flag=True, help="Print tokens as they arrive.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=float)
@click.option("--top-k", type=int)
@click.option("--top-p", type=float)
@click.option("--seed", type=int)
@click.option("--stop", multiple=True, help="Stop word (repeatable).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300,
    show_default=True,
    help="Seconds to wait for the answer.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full response as JSON.")
def command(
    url,
    protocol,
    model,
    prompt,
    messages_file,
    chat,
    stream,
    max_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    stop,
    timeout,
    as_json,
):
    """Send a prompt (or a chat) to the served model and print the generated text."""
    from nim_build.serving.client import Client, GenerateRequest

    if (prompt is None) == (messages_file is None):
        raise UserError("give exactly one of --prompt or --messages")
    messages = tools = None
    if messages_file is not None:
        try:
            data = json.load(messages_file)
        except json.JSONDecodeError as e:
            raise UserError(f"--messages is not valid JSON: {e}") from None
        messages, tools = (data.get("messages"), data.get("tools")) if isinstance(data, dict) else (data, None)
    elif chat:
        messages, prompt = [{"role": "user", "content": prompt}], None
    req = GenerateRequest(
        prompt=prompt,
        messages=messages,
        tools=tools,
        max_tokens=max_tokens,
        stream=stream,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=list(stop),
    )
    client = Client(url, protocol, model, timeout_s=timeout)
    printer = None if as_json or not stream else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = client.generate(req, on_chunk=printer)
    if as_json:
        click.echo(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    elif stream:
        click.echo()
    else:
        click.echo(result.text)
