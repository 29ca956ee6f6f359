"""The OpenAI API's way to the engine: Triton's `tensorrt_llm` model, token ids in and out, over gRPC on loopback.

Generations share one bidirectional ModelStreamInfer stream (TritonLLM), each request with its own id, streaming
(new tokens per response; a model that is not decoupled answers once) and `triton_enable_empty_final_response`,
so its end is always seen. Tensors travel as raw little-endian bytes. A generation left before its final response
(a client that disconnected, a stop string found in the text) is stopped by id, and the engine frees its KV blocks.
The stream itself is never cancelled while generations are open (Triton 2.51 holds a model whose stream was
cancelled after its final response at shutdown, see serving/client.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from nim_build.errors import InferenceError

GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# Triton's type names for the numpy types the inputs use
_TYPES = {np.int32: "INT32", np.uint64: "UINT64", np.float32: "FP32", np.bool_: "BOOL"}


@dataclass
class EngineRequest:
    """One sequence to generate, in the `tensorrt_llm` model's terms (TensorRT-LLM's sampling semantics)."""

    prompt_ids: list[int]
    max_tokens: int
    end_id: int  # -1: never stop on an end id (ignore_eos)
    pad_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # with top_p 1: sampling over the whole vocabulary; temperature 0 or top_k 1: greedy
    seed: int = 0
    stop_words: list[list[int]] = field(default_factory=list)
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    embedding_bias: np.ndarray | None = None  # float32 [vocab]
    streaming: bool = True  # a response per step; False for a model that is not decoupled (one response)
    generation_logits: bool = False  # logprobs (reference backend): the raw logits of every generated token
    log_probs: bool = False  # logprobs (TensorRT-LLM engines, which gather no logits by default)

    def tensors(self) -> list[tuple[str, np.ndarray]]:
        def scalar(value, dtype):
            return np.asarray([[value]], dtype=dtype)

        out = [
            ("input_ids", np.asarray([self.prompt_ids], dtype=np.int32)),
            ("input_lengths", scalar(len(self.prompt_ids), np.int32)),
            ("request_output_len", scalar(self.max_tokens, np.int32)),
            ("end_id", scalar(self.end_id, np.int32)),
            ("pad_id", scalar(self.pad_id, np.int32)),
            ("streaming", scalar(self.streaming, np.bool_)),
            ("exclude_input_in_output", scalar(True, np.bool_)),
            ("temperature", scalar(self.temperature, np.float32)),
            ("runtime_top_p", scalar(self.top_p, np.float32)),
            ("runtime_top_k", scalar(self.top_k, np.int32)),
            ("seed", scalar(self.seed, np.uint64)),
        ]
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                out.append((name, scalar(getattr(self, name), np.float32)))
        if self.min_tokens:
            out.append(("min_tokens", scalar(self.min_tokens, np.int32)))
        if self.stop_words:
            from nim_build.serving.tokenizer import to_word_list_format

            out.append(("stop_words_list", to_word_list_format(self.stop_words)[None]))
        if self.embedding_bias is not None:
            out.append(("embedding_bias", np.asarray(self.embedding_bias, dtype=np.float32)[None]))
        if self.generation_logits:
            out.append(("return_generation_logits", scalar(True, np.bool_)))
        if self.log_probs:
            out.append(("return_log_probs", scalar(True, np.bool_)))
        return out


@dataclass
class Delta:
    token_ids: list[int]
    logits: np.ndarray | None  # float32 [len(token_ids), vocab] when generation logits were asked for
    final: bool
    log_probs: list[float] | None = None  # one per token id, when log probs were asked for


class TritonLLM:
    """Async client of one `tensorrt_llm` model (make it inside the event loop that uses it).

    Every generation goes over one bidirectional stream, opened at the first and again after it breaks: a new
    gRPC call per generation cost ~0.9 ms more per request here (p50 2.15 vs 1.25 ms for a 1-token request). A
    reader task hands each response to its generation's sink, found by request id, with no task switch in between.
    A generation left before its final response is stopped with a `stop` request for its id, as TensorRT-LLM's
    clients stop one (the engine frees its KV blocks).
    """

    def __init__(self, grpc_url: str, model: str = "tensorrt_llm"):
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._pb = service_pb2
        self._channel = grpc.aio.insecure_channel(grpc_url, options=GRPC_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self.model = model
        self._open: dict[str, Callable] = {}  # request id -> its sink, until its last response
        self._outbox: asyncio.Queue | None = None  # requests to send on the stream; None ends it
        self._reader: asyncio.Task | None = None

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()

    def submit(self, req: EngineRequest, request_id: str, sink: Callable[[Delta | InferenceError], None]):
        """Send a generation; `sink` gets each Delta as it comes (the last one final), or one InferenceError (an
        error response, a lost stream), on the reader task. Returns stop(): ends the generation early."""
        self._open[request_id] = sink
        outbox = self._stream()
        outbox.put_nowait(self._request(req, request_id))

        def stop() -> None:
            if self._open.pop(request_id, None) is not None:  # not answered to its end yet
                outbox.put_nowait(self._stop(request_id))

        return stop

    async def generate(self, req: EngineRequest, request_id: str) -> AsyncIterator[Delta]:
        """submit() as an async iterator of Deltas; raises InferenceError."""
        queue: asyncio.Queue = asyncio.Queue()
        stop = self.submit(req, request_id, queue.put_nowait)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, InferenceError):
                    raise item
                yield item
                if item.final:
                    return
        finally:
            stop()

    def _stream(self) -> asyncio.Queue:
        """The stream's outbox, opening the stream when there is none (or it broke)."""
        if self._reader is None or self._reader.done():
            outbox: asyncio.Queue = asyncio.Queue()

            async def requests():
                while (request := await outbox.get()) is not None:
                    yield request

            self._outbox = outbox
            self._reader = asyncio.ensure_future(self._read(self._stub.ModelStreamInfer(requests())))
        return self._outbox

    async def _read(self, call) -> None:
        import grpc

        why = "Triton closed the stream"
        try:
            async for reply in call:
                rid = reply.infer_response.id
                sink = self._open.get(rid)
                if sink is None:
                    continue  # a stopped generation's last words, or a stop request's answer
                if reply.error_message:  # an error response is the request's last
                    del self._open[rid]
                    sink(InferenceError(reply.error_message))
                    continue
                delta = _delta(reply.infer_response)
                if delta.final:
                    del self._open[rid]
                sink(delta)
        except grpc.aio.AioRpcError as e:
            why = f"Triton at loopback gRPC: {e.details() or e.code().name}"
        finally:
            lost, self._open = self._open, {}  # the generations still open have lost their stream
            for sink in lost.values():
                sink(InferenceError(why))

    def _request(self, req: EngineRequest, request_id: str):
        return self._inputs(request_id, req.tensors(), req.generation_logits, req.log_probs)

    def _inputs(self, request_id: str, tensors, generation_logits=False, log_probs=False):
        pb = self._pb.ModelInferRequest(model_name=self.model, id=request_id)
        pb.parameters["triton_enable_empty_final_response"].bool_param = True
        for name, arr in tensors:
            t = pb.inputs.add(name=name, datatype=_TYPES[arr.dtype.type])
            t.shape.extend(arr.shape)
            pb.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
        pb.outputs.add(name="output_ids")
        if generation_logits:
            pb.outputs.add(name="generation_logits")
        if log_probs:
            pb.outputs.add(name="output_log_probs")
        return pb

    def _stop(self, request_id: str):
        """TensorRT-LLM's stop request for the request with this id (its required inputs are placeholders)."""
        one = np.asarray([[1]], dtype=np.int32)
        tensors = [("input_ids", one), ("input_lengths", one), ("request_output_len", one)]
        return self._inputs(request_id, tensors + [("stop", np.asarray([[True]]))])


def _delta(response) -> Delta:
    ids, logits, log_probs = [], None, None
    for i, out in enumerate(response.outputs):
        raw = response.raw_output_contents[i]
        if out.name == "output_ids":
            ids = np.frombuffer(raw, dtype=np.int32).tolist()
        elif out.name == "generation_logits" and raw:
            # streaming [1, new tokens, beam, vocab]; one response [1, beam, max tokens, vocab], rows past the end 0
            logits = np.frombuffer(raw, dtype=np.float32).reshape(-1, out.shape[-1])[: len(ids)]
        elif out.name == "output_log_probs":
            log_probs = np.frombuffer(raw, dtype=np.float32).tolist()
    if log_probs is not None:  # the last ones are the new tokens' (a backend may send those of the whole output)
        log_probs = log_probs[len(log_probs) - len(ids) :] if ids else []
    final = response.parameters.get("triton_final_response")
    return Delta(ids, logits, final is not None and final.bool_param, log_probs)
