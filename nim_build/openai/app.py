"""The OpenAI-compatible API (and NIM's health, metrics and metadata endpoints) in front of a Triton repository.

Requests are rendered and tokenized here with the repository's own tokenizer (nim_build.serving.tokenizer: HF chat
templates, Tekken through mistral-common), sent to Triton's `tensorrt_llm` model as token ids (triton_llm.py), and
detokenized with the same streaming detokenizer the postprocessing uses. So usage counts are exact, special tokens
are seen as ids (tool calls), and there is no second copy of the chat template or the detokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from nim_build.errors import InferenceError, UserError, is_queue_full
from nim_build.openai import protocol as P
from nim_build.openai.metrics import Metrics
from nim_build.openai.tools import ToolCallParser, forced_prefix, mistral_tool_call_id, tool_style
from nim_build.openai.triton_llm import EngineRequest, TritonLLM
from nim_build.serving.http_guard import DEFAULT_MAX_BODY
from nim_build.serving.server import HEALTH_FAILURES_ALLOWED, engine_steps
from nim_build.serving.tokenizer import Tokenizer

PROBE_TIMEOUT_S = 30.0
MAX_BODY = DEFAULT_MAX_BODY  # bytes of a request body: what serve's HTTP guard lets through to Triton, too
MAX_CHOICES = 4 * P.MAX_N  # prompts x n of one completions request
OFFLOAD_BYTES = 64 << 10  # requests larger than this are rendered and tokenized in a thread


@dataclass
class ServedModel:
    """What the API serves, read from a repository made by `nim_build repo` (and the engine's manifest)."""

    name: str
    tokenizer: Tokenizer
    max_seq_len: int
    max_batch_size: int
    vocab_size: int  # the model's (embedding_bias' length)
    manifest: dict[str, Any]
    backend: str  # "reference" or "trtllm"
    chat_template: bool
    extra_end_ids: list[int]  # end ids beyond the first (Llama 3's <|eot_id|>, <|eom_id|>): stop tokens
    decoupled: bool  # tensorrt_llm's transaction policy: responses per step, or one

    @property
    def token_ids(self) -> int:
        """Ids below this are tokens of both the model and the tokenizer (a model's vocabulary may be padded)."""
        return min(self.vocab_size, self.tokenizer.vocab_size)

    @classmethod
    def from_repo(cls, repo: str | Path, served_name: str | None = None) -> ServedModel:
        from nim_build.builder.manifest import ENGINE_DIR, load_manifest
        from nim_build.jsonfile import read_object
        from nim_build.serving.repo import read_config
        from nim_build.serving.tokenizer import META_FILE, REPO_TOKENIZER_DIR

        repo = Path(repo)
        cfg = read_config(repo / "tensorrt_llm" / "config.pbtxt")
        engine = Path(cfg.parameters["gpt_model_path"].string_value)
        manifest = load_manifest(engine.parent if engine.name == ENGINE_DIR and cfg.backend != "python" else engine)
        tok_dir = repo / REPO_TOKENIZER_DIR
        meta = read_object(tok_dir / META_FILE)
        tok = Tokenizer.from_dir(tok_dir, meta)
        tok.load_chat_template()  # at start: an HF template loads transformers, seconds the first chat must not wait
        tok.token_text(0)  # and logprobs' byte table (a quarter second)
        return cls(
            name=served_name or manifest.get("name") or "model",
            tokenizer=tok,
            max_seq_len=int(meta.get("max_seq_len") or manifest["build"]["max_seq_len"]),
            max_batch_size=int(cfg.max_batch_size or meta.get("max_batch_size") or 1),
            vocab_size=int(meta.get("vocab_size") or tok.vocab_size),
            manifest=manifest,
            backend=manifest.get("backend") or "reference",
            chat_template=tok.has_chat_template(),
            extra_end_ids=tok.other_end_ids(),
            decoupled=cfg.model_transaction_policy.decoupled,
        )


class Choice:
    """One generated sequence: ids -> text (stop strings cut, tool calls parsed), log probs, finish reason."""

    def __init__(self, index: int, tok: Tokenizer, parser: ToolCallParser, stops: list[str], top_logprobs: int | None):
        self.index, self.tok, self.parser = index, tok, parser
        self.stops, self.hold = stops, max((len(s) for s in stops), default=1) - 1
        self.top_logprobs = top_logprobs  # None: no log probs
        self.ids: list[int] = []
        self.text = ""  # the content so far, as sent
        self.pending = ""  # content held back: it may be the start of a stop string
        self.stopped = False  # a stop string was found: the rest of the generation is dropped
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.tool_calls: list = []

    def feed(self, ids: list[int], logits: np.ndarray | None, log_probs: list[float] | None = None) -> tuple[str, list]:
        """New content text and tool deltas for newly generated ids (with their logits or log probs)."""
        if self.stopped:
            return "", []
        self.ids.extend(ids)
        if self.top_logprobs is not None and logits is not None:
            self.logprobs.extend(_logprobs(self.tok, ids, logits, self.top_logprobs))
        elif self.top_logprobs is not None and log_probs is not None:
            self.logprobs.extend({**_token(self.tok, i, lp), "top_logprobs": []} for i, lp in zip(ids, log_probs))
        text, deltas = self.parser.feed(ids)
        text = self._cut(text)
        self.text += text
        return text, deltas

    def finish(self, max_tokens: int) -> tuple[str, list]:
        if self.stopped:
            self.finish_reason = "stop"
            return "", []
        text, deltas, parsed = self.parser.finish()
        text = self._cut(text, final=True)
        self.text += text
        self.tool_calls = parsed.tool_calls
        if self.stopped:
            self.finish_reason = "stop"
        elif parsed.tool_calls:
            self.finish_reason = "tool_calls"
        else:
            self.finish_reason = "length" if len(self.ids) >= max_tokens else "stop"
        return text, deltas

    def _cut(self, text: str, final: bool = False) -> str:
        """OpenAI's stop: the text up to the first stop string, which is not part of it."""
        if not self.stops:
            return text
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[: min(hits)]
        keep = 0 if final else min(self.hold, len(buf))
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]


def _logprobs(tok: Tokenizer, ids: list[int], logits: np.ndarray, top: int) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs entries: the log-softmax of the model's raw logits at each generated token."""
    out = []
    for row, i in zip(logits, ids):
        row = row.astype(np.float64)
        m = row.max()
        lp = row - (m + np.log(np.exp(row - m).sum()))
        best = np.argpartition(-lp, top - 1)[:top] if top else np.zeros(0, dtype=np.int64)
        alternatives = [_token(tok, int(j), float(lp[j])) for j in best[np.argsort(-lp[best], kind="stable")]]
        out.append({**_token(tok, i, float(lp[i])), "top_logprobs": alternatives})
    return out


def _token(tok: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    """One token of OpenAI's logprobs: its text, log prob and bytes."""
    text, data = tok.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(data)}


class OpenAIServer:
    """The state behind the API: the model, the engine client, metrics and readiness."""

    def __init__(self, model: ServedModel, grpc_url: str, triton_metrics_url: str | None, health_interval_s: float):
        self.model, self.grpc_url, self.health_interval_s = model, grpc_url, health_interval_s
        self.metrics = Metrics(model.name, triton_metrics_url)
        self.llm: TritonLLM | None = None
        self.ready = False
        self.probe_failures = 0
        self.tokens_seen = 0  # generated tokens of this API: a probe that timed out while it grew was busy
        self._probe_task: asyncio.Task | None = None
        self.tool_style = tool_style(model.tokenizer)
        self.created = int(time.time())

    # -- lifecycle and readiness --------------------------------------------------------------------------------
    async def start(self) -> None:
        self.llm = TritonLLM(self.grpc_url)
        await self.probe()
        self._probe_task = asyncio.create_task(self._probe_loop())

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self.llm is not None:
            await self.llm.close()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.probe()

    async def probe(self) -> None:
        """Ready while a real one-token generation succeeds, as serve's supervision rules: one that timed out while
        the engine made progress (it waited behind others) is no failure, and HEALTH_FAILURES_ALLOWED failures in a
        row are tolerated."""
        req = self._engine_request(self.model.tokenizer.encode("ping"), 1, temperature=0.0, seed=0)
        before = (self.tokens_seen, await self._engine_steps())
        try:
            await asyncio.wait_for(self._drain(req), PROBE_TIMEOUT_S)
            self.probe_failures = 0
        except Exception as e:
            after = (self.tokens_seen, await self._engine_steps())
            busy = isinstance(e, asyncio.TimeoutError) and (after[0] > before[0] or (after[1] or 0) > (before[1] or 0))
            self.probe_failures = 0 if busy else self.probe_failures + 1
        self.ready = self.probe_failures == 0 or (self.ready and self.probe_failures <= HEALTH_FAILURES_ALLOWED)

    async def _engine_steps(self) -> float | None:
        url = self.metrics.triton_metrics_url
        if not url:
            return None
        try:
            return await asyncio.to_thread(engine_steps, url)
        except Exception:
            return None

    async def _drain(self, req: EngineRequest) -> None:
        async with contextlib.aclosing(self.llm.generate(req, f"probe-{uuid.uuid4().hex}")) as deltas:
            async for _ in deltas:
                pass

    # -- requests -----------------------------------------------------------------------------------------------
    def check_logprobs(self, top: int | None) -> None:
        if top and self.model.backend != "reference":
            raise P.OpenAIError(
                "top_logprobs: a TensorRT-LLM engine returns the chosen tokens' log probs only (it gathers no "
                "logits); ask for logprobs without top_logprobs",
                param="top_logprobs",
            )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model.name:
            raise P.OpenAIError(
                f"the model {name!r} does not exist; this server serves {self.model.name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def _engine_request(self, prompt_ids: list[int], max_tokens: int, **params) -> EngineRequest:
        tok = self.model.tokenizer
        params.setdefault("end_id", tok.end_id)
        return EngineRequest(
            prompt_ids=prompt_ids, max_tokens=max_tokens, pad_id=tok.pad_id, streaming=self.model.decoupled, **params
        )

    def max_tokens(self, req: P._Request, prompt_len: int, requested: int | None) -> int:
        """The request's max tokens, checked against the context (default: what fits)."""
        context = self.model.max_seq_len
        if prompt_len >= context:
            raise P.OpenAIError(
                f"the prompt is {prompt_len} tokens; this model's context is {context} tokens, which leaves no room "
                "to generate: shorten the prompt",
                param="messages" if isinstance(req, P.ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        if requested is None:
            return context - prompt_len
        if prompt_len + requested > context:
            raise P.OpenAIError(
                f"max_tokens {requested} + the prompt's {prompt_len} tokens exceed this model's context of {context} "
                f"tokens: ask for at most {context - prompt_len}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def sampling(self, req: P._Request) -> dict[str, Any]:
        """The engine's sampling inputs of a request but the seed (TensorRT-LLM's semantics: docs/OPENAI.md)."""
        base: dict[str, Any]
        if req.temperature == 0:
            base = {"temperature": 0.0, "top_p": 1.0, "top_k": 1}
        else:
            temperature = 1.0 if req.temperature is None else req.temperature
            base = {"temperature": temperature, "top_p": req.top_p or 1.0, "top_k": max(req.top_k or 0, 0)}
        if req.ignore_eos:
            base["end_id"] = -1
        if req.repetition_penalty is not None:
            base["repetition_penalty"] = req.repetition_penalty
        if req.presence_penalty:
            base["presence_penalty"] = req.presence_penalty
        if req.frequency_penalty:
            base["frequency_penalty"] = req.frequency_penalty
        if req.min_tokens:
            base["min_tokens"] = req.min_tokens
        stop_words = self.model.tokenizer.words_to_ids(req.stop_list())
        if not req.ignore_eos:
            stop_words += [[i] for i in self.model.extra_end_ids]
        if stop_words:
            base["stop_words"] = stop_words
        if req.logit_bias:
            bias = np.zeros(self.model.vocab_size, dtype=np.float32)
            for key, value in req.logit_bias.items():
                if not key.lstrip("-").isdigit() or not 0 <= int(key) < self.model.token_ids:
                    raise P.OpenAIError(
                        f"logit_bias: {key!r} is not a token id in [0, {self.model.token_ids})", param="logit_bias"
                    )
                bias[int(key)] = max(-100.0, min(100.0, value))
            base["embedding_bias"] = bias
        return base

    @staticmethod
    def seeds(req: P._Request) -> list[int]:
        """The seed of each of a prompt's n choices. An unseeded request is random, as OpenAI's are (TensorRT-LLM's
        default seed is 0 for every request); choice k of a seeded one uses seed + k, as TensorRT-LLM's
        num_return_sequences does."""
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        return [(seed + k) % 2**64 for k in range(req.n)]

    async def run(
        self, prompts: list[list[int]], req: P._Request, max_tokens: list[int], choices: list[Choice]
    ) -> AsyncIterator[tuple[Choice, str, list, bool]]:
        """Generate `choices` (n per prompt, in order) concurrently; yields (choice, new text, tool deltas, done)
        as they come, done (and the choice's finish_reason set) in each choice's last."""
        queue: asyncio.Queue = asyncio.Queue()
        sinks: list[_Sink] = []
        n = req.n
        t0 = time.monotonic()
        first: float | None = None
        params = self.sampling(req)  # the same for every choice; the seeds differ
        for p, ids in enumerate(prompts):
            for k, seed in enumerate(self.seeds(req)):
                choice = choices[p * n + k]
                engine_req = self._engine_request(ids, max_tokens[p], seed=seed, **params)
                if choice.top_logprobs is not None:  # the reference runtime's raw logits; TensorRT-LLM's log probs
                    engine_req.generation_logits = self.model.backend == "reference"
                    engine_req.log_probs = not engine_req.generation_logits
                sink = _Sink(self, choice, max_tokens[p], queue)
                sink.stop = self.llm.submit(engine_req, uuid.uuid4().hex, sink)
                sinks.append(sink)
        self.metrics.in_flight += len(sinks)
        open_ = len(sinks)
        ok = False
        try:
            while open_:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                choice, text, deltas, done = item
                if first is None:
                    first = time.monotonic()
                    self.metrics.ttft.observe(first - t0)
                open_ -= done
                yield choice, text, deltas, done
            ok = True
        finally:
            for sink in sinks:  # what is still generating (the client left, another choice failed)
                sink.stop()
            self.metrics.in_flight -= len(sinks)
            generated = sum(len(c.ids) for c in choices)
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
            self.metrics.generation_tokens.inc(generated)
            end = time.monotonic()
            self.metrics.e2e.observe(end - t0)
            if first is not None and generated > len(choices):
                self.metrics.tpot.observe((end - first) / (generated - len(choices)))
            (self.metrics.success if ok else self.metrics.failure).inc()


class _Sink:
    """What one choice does with each engine response, on the engine client's reader task: feed the choice, queue
    (choice, new text, tool deltas, done) for OpenAIServer.run, stop the engine at a stop string."""

    def __init__(self, server: OpenAIServer, choice: Choice, max_tokens: int, queue: asyncio.Queue):
        self.server, self.choice, self.max_tokens, self.queue = server, choice, max_tokens, queue
        self.stop = lambda: None  # TritonLLM.submit's

    def __call__(self, item) -> None:
        choice, queue = self.choice, self.queue
        if isinstance(item, InferenceError):
            queue.put_nowait(engine_error(str(item)))
            return
        try:
            self.server.tokens_seen += len(item.token_ids)
            text, deltas = choice.feed(item.token_ids, item.logits, item.log_probs)
            if text or deltas:
                queue.put_nowait((choice, text, deltas, False))
            if choice.stopped or item.final:
                if not item.final:
                    self.stop()  # a stop string: the rest of the generation is not wanted
                text, deltas = choice.finish(self.max_tokens)
                queue.put_nowait((choice, text, deltas, True))
        except Exception as e:  # never lose the request: the client gets a server error, not a hang
            queue.put_nowait(e)


# what the engine says of a value it refuses (the reference runtime's and TensorRT-LLM's own words)
_USER_ERRORS = ("must be", "outside", "exceeds", "out of range", "invalid")


def engine_error(message: str) -> P.OpenAIError:
    """A value the engine refused is a 400 with its message, a full queue a 503; any other engine error is a 500
    that says no more (the engine's message may name files and lines of the server) and goes to the server's log."""
    if is_queue_full(message):
        return P.OpenAIError(f"the server is at capacity: {message}", status=503)
    if any(w in message.lower() for w in _USER_ERRORS):
        return P.OpenAIError(f"the engine refused the request: {message}")
    print(f"nim_build.openai: generation failed: {message}", file=sys.stderr, flush=True)
    return P.OpenAIError("generation failed in the engine (the server's log has the details)", status=500)


def render_chat(server: OpenAIServer, req: P.ChatCompletionRequest) -> tuple[list[int], str | None, str | None]:
    """The prompt ids of a chat request, the tool-call format to parse (None: no tools) and the forced prefix."""
    P.check_messages(req.messages)
    P.check_tools(req.tools, req.tool_choice)
    if not server.model.chat_template:
        raise P.OpenAIError("this model has no chat template: send plain text to /v1/completions", param="messages")
    messages = P.flatten_content(req.messages)
    tok = server.model.tokenizer
    choice = req.tool_choice
    tools = req.tools if req.tools and choice != "none" else None
    function = choice["function"]["name"] if isinstance(choice, dict) else None
    style = server.tool_style if tools else None
    if tools and not tok.renders_tools():
        raise P.OpenAIError("this model's chat template does not render tools: send the request without them")
    # earlier calls in the history, as the tokenizer's format takes them (whether or not this request offers tools)
    mistral = server.tool_style == "mistral"
    messages = [_mistral_ids(m) if mistral else _json_arguments(m) for m in messages]
    try:
        ids = tok.encode_chat(messages, tools)
    except UserError as e:
        raise P.OpenAIError(str(e), param="messages") from None
    prefix = None
    if tools and (choice == "required" or function is not None):
        prefix = forced_prefix(style, function)
        if style == "mistral":
            ids = ids + [tok.special_id("[TOOL_CALLS]")]
        ids = ids + (tok.encode(prefix, add_special_tokens=False) if prefix else [])
    return ids, style, prefix


def _mistral_ids(m: dict[str, Any]) -> dict[str, Any]:
    """Client tool call ids as Mistral's format takes them (longer ones cut to their last 9 characters)."""
    if m.get("role") == "tool" and isinstance(m.get("tool_call_id"), str):
        m = {**m, "tool_call_id": mistral_tool_call_id(m["tool_call_id"])}
    if m.get("role") == "assistant" and m.get("tool_calls"):
        m = {
            **m,
            "tool_calls": [{**c, "id": mistral_tool_call_id(str(c.get("id", "")))} for c in m["tool_calls"]],
        }
    return m


def _json_arguments(m: dict[str, Any]) -> dict[str, Any]:
    """An earlier call's arguments as an object for HF templates (OpenAI sends a JSON string; Llama 3.1's template
    writes `arguments | tojson`, which would encode the string twice)."""
    if m.get("role") != "assistant" or not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        fn = dict(c.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass  # the template gets the text as it came
        calls.append({**c, "function": fn})
    return {**m, "tool_calls": calls}


def json_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# -- the HTTP API -----------------------------------------------------------------------------------------------


def create_app(server: OpenAIServer) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="nim_build OpenAI-compatible API", lifespan=lifespan, openapi_url=None, docs_url=None)
    tok = server.model.tokenizer

    def error(e: P.OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(P.OpenAIError)
    async def _openai_error(_request, e: P.OpenAIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, e: RequestValidationError):
        err = e.errors()[0]
        return error(P.OpenAIError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"))

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return error(P.OpenAIError(str(e.detail), status=e.status_code))

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        return error(P.internal_error(e))

    async def body(request: Request) -> Any:
        """The request's JSON, at most MAX_BODY bytes (counted as they arrive, chunked or not)."""
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > MAX_BODY:
                raise P.OpenAIError(f"the request body is larger than this server accepts ({MAX_BODY} bytes)", 413)
        request.state.body_size = len(raw)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.OpenAIError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise P.OpenAIError("the request body is not valid JSON: nested too deeply") from None

    async def offload(request: Request, fn, *args):
        """fn(*args), in a thread for a large request (tokenizing it would hold up every stream): a thread hop costs
        about a millisecond here, more than a small request's tokenization."""
        if request.state.body_size > OFFLOAD_BYTES:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def usable(req: P._Request) -> None:
        server.check_model(req.model)
        why = P.unsupported(req)
        if why:
            raise P.OpenAIError(why)
        if not server.ready:
            raise P.OpenAIError("the model is not ready yet; retry shortly", status=503)

    async def until_disconnect(request: Request, work) -> tuple[bool, Any]:
        """(True, the result of `work`), or (False, None) when the client disconnected first: that cancels `work`
        and with it the engine's requests."""
        task = asyncio.ensure_future(work)

        async def watch():  # the body was read: the next ASGI message is the client's disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            return True, await task
        except asyncio.CancelledError:
            if watcher.done():  # the client left: nobody to answer
                return False, None
            raise
        finally:
            watcher.cancel()

    def usage(prompts: list[list[int]], choices: list[Choice]) -> dict[str, int]:
        prompt = sum(len(p) for p in prompts)
        completion = sum(len(c.ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(request: Request, req: P._Request, prompts, max_tokens, choices, head: dict, whole, chunks):
        """Generate the choices; answer `whole()` (a dict) once done, or, streaming, server-sent events: each of the
        `chunks(item)` of each item server.run yields (with `head`'s id, object, created and model), the usage chunk
        when asked for, then [DONE]."""
        agen = server.run(prompts, req, max_tokens, choices)

        async def drain():
            async for _ in agen:
                pass

        async def first():  # before the response starts: an immediate engine error is still an HTTP error
            return await anext(agen, None)

        answered, item = await until_disconnect(request, drain() if not req.stream else first())
        if not answered:
            await agen.aclose()
            return Response(status_code=499)  # nginx's "client closed request"; the client is gone
        if not req.stream:
            return whole()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def line(choice_entries: list[dict], **extra) -> str:
            out = {**head, "choices": choice_entries}
            if include_usage:
                out["usage"] = None
            out.update(extra)
            return json_line(out)

        async def events():
            nonlocal item
            try:
                while item is not None:
                    for entry in chunks(item):
                        yield line([entry])
                    item = await anext(agen, None)
                if include_usage:
                    yield line([], usage=usage(prompts, choices))
            except P.OpenAIError as e:
                yield json_line(e.body())
            except Exception as e:  # the stream still ends in OpenAI's shape
                yield json_line(P.internal_error(e).body())
            finally:
                await agen.aclose()
            yield "data: [DONE]\n\n"

        # the background task closes the generation also when the client left before the first chunk
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(agen.aclose))

    # -- chat ---------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = P.parse(P.ChatCompletionRequest, await body(request))
        usable(req)
        if req.top_logprobs and not req.logprobs:
            raise P.OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        ids, style, prefix = await offload(request, render_chat, server, req)
        max_tokens = server.max_tokens(req, len(ids), req.max_completion_tokens or req.max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        server.check_logprobs(top)
        stops = req.stop_list()
        choices = [Choice(i, tok, ToolCallParser(tok, style, prefix), stops, top) for i in range(req.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time())}
        head["model"] = server.model.name

        def tool_calls(c: Choice) -> list[dict]:
            calls = c.tool_calls if req.parallel_tool_calls else c.tool_calls[:1]
            return [
                {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}} for t in calls
            ]

        def whole() -> dict:
            out = []
            for c in choices:
                message: dict[str, Any] = {"role": "assistant", "content": c.text or (None if c.tool_calls else "")}
                if c.tool_calls:
                    message["tool_calls"] = tool_calls(c)
                logprobs = {"content": c.logprobs} if top is not None else None
                out.append(
                    {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason}
                )
            return {**head, "choices": out, "usage": usage([ids], choices)}

        sent_logprobs = [0] * req.n
        started = [False] * req.n

        def chunks(item) -> list[dict]:
            c, text, deltas, done = item
            out = []

            def entry(delta: dict, finish: str | None = None, logprobs=None) -> dict:
                return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

            if not started[c.index]:
                started[c.index] = True
                out.append(entry({"role": "assistant", "content": ""}))
            lp = None
            if top is not None and len(c.logprobs) > sent_logprobs[c.index]:
                lp = {"content": c.logprobs[sent_logprobs[c.index] :]}
                sent_logprobs[c.index] = len(c.logprobs)
            if text or lp:
                out.append(entry({"content": text}, logprobs=lp))
            for d in deltas:
                if not req.parallel_tool_calls and d.index > 0:
                    continue
                call: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
                if d.name is not None:
                    call.update(id=d.id, type="function")
                    call["function"]["name"] = d.name
                out.append(entry({"tool_calls": [call]}))
            if done:
                out.append(entry({}, c.finish_reason))
            return out

        chunk_head = {**head, "object": "chat.completion.chunk"}
        return await respond(request, req, [ids], [max_tokens], choices, chunk_head, whole, chunks)

    # -- completions --------------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        req = P.parse(P.CompletionRequest, await body(request))
        usable(req)
        prompts = _prompts(req.prompt)
        if not prompts or len(prompts) * req.n > MAX_CHOICES:
            raise P.OpenAIError(f"give between 1 and {MAX_CHOICES} prompts x choices", param="prompt")
        if req.echo and req.logprobs is not None:
            raise P.OpenAIError("echo with logprobs is not supported (no prompt log probs)", param="echo")
        ids_list = await offload(request, lambda: [tok.encode(p) if isinstance(p, str) else p for p in prompts])
        for ids in ids_list:
            if not ids:
                raise P.OpenAIError("the prompt is empty", param="prompt")
            bad = next((i for i in ids if not 0 <= i < server.model.token_ids), None)
            if bad is not None:
                raise P.OpenAIError(
                    f"prompt: token id {bad} is outside the vocabulary [0, {server.model.token_ids})", param="prompt"
                )
        max_tokens = [server.max_tokens(req, len(ids), req.max_tokens) for ids in ids_list]
        top = req.logprobs
        server.check_logprobs(top)
        stops = req.stop_list()
        n = req.n
        choices = [Choice(i, tok, ToolCallParser(tok, None), stops, top) for i in range(len(ids_list) * n)]
        echo = [tok.decode(ids) if req.echo else "" for ids in ids_list]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = server.model.name

        def logprobs(entries: list[dict], offset: int) -> dict | None:
            if top is None:
                return None
            offsets, pos = [], offset
            for e in entries:
                offsets.append(pos)
                pos += len(e["token"])
            return {
                "tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets,
            }

        def whole() -> dict:
            out = [
                {
                    "index": c.index,
                    "text": echo[c.index // n] + c.text,
                    "logprobs": logprobs(c.logprobs, 0),
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ]
            return {**head, "choices": out, "usage": usage(ids_list, choices)}

        sent = [0] * len(choices)
        offsets: list[int | None] = [None] * len(choices)

        def chunks(item) -> list[dict]:
            c, text, _, done = item
            if offsets[c.index] is None:
                offsets[c.index] = 0
                text = echo[c.index // n] + text
            lp = logprobs(c.logprobs[sent[c.index] :], offsets[c.index])
            sent[c.index] = len(c.logprobs)
            offsets[c.index] += len(text)
            if not (text or (lp and lp["tokens"]) or done):
                return []
            finish = c.finish_reason if done else None
            return [{"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}]

        return await respond(request, req, ids_list, max_tokens, choices, head, whole, chunks)

    # -- models, health, metrics, metadata ---------------------------------------------------------------------
    def model_card() -> dict:
        name = server.model.name
        return {
            "id": name,
            "object": "model",
            "created": server.created,
            "owned_by": "nim_build",
            "root": name,
            "parent": None,
            "max_model_len": server.model.max_seq_len,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return model_card()

    @app.get("/v1/health/live")
    async def live():
        return {"object": "health-response", "message": "live"}

    @app.get("/v1/health/ready")
    async def ready():
        if not server.ready:
            raise P.OpenAIError("not ready: the last health generation did not succeed", status=503)
        return {"object": "health-response", "message": "ready"}

    @app.get("/v1/metrics")
    async def metrics():
        data = await asyncio.to_thread(server.metrics.exposition)
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/version")
    async def version():
        from nim_build import __version__

        return {"release": __version__, "api": "1.0.0"}

    @app.get("/v1/metadata")
    async def metadata():
        return server_metadata(server.model)

    # -- vLLM's tokenize / detokenize ---------------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = P.parse(P.TokenizeRequest, await body(request))
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise P.OpenAIError("give exactly one of prompt or messages")
        if req.messages is not None:
            chat = P.parse(P.ChatCompletionRequest, {"messages": req.messages, "tools": req.tools})
            ids, _, _ = await offload(request, render_chat, server, chat)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": server.model.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = P.parse(P.DetokenizeRequest, await body(request))
        server.check_model(req.model)
        limit = server.model.token_ids
        bad = next((i for i in req.tokens if not 0 <= i < limit), None)
        if bad is not None:
            raise P.OpenAIError(f"tokens: id {bad} is outside the vocabulary [0, {limit})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    return app


def _prompts(prompt) -> list:
    """A completions prompt in any of OpenAI's four shapes -> a list of strings or of id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def server_metadata(model: ServedModel) -> dict[str, Any]:
    """NIM's /v1/metadata, from the engine's manifest."""
    m = model.manifest
    build, source = m.get("build") or {}, m.get("model") or {}
    return {
        "modelInfo": [{"shortName": model.name, "modelUrl": source.get("source")}],
        "model": model.name,
        "source": source.get("source"),
        "backend": m.get("backend"),
        "quantization": build.get("quant"),
        "kv_cache": build.get("kv_cache"),
        "tensor_parallel_size": build.get("tp"),
        "pipeline_parallel_size": build.get("pp"),
        "max_seq_len": model.max_seq_len,
        "max_batch_size": model.max_batch_size,
        "tokenizer": (m.get("tokenizer") or {}).get("kind"),
        "versions": m.get("versions"),
    }
