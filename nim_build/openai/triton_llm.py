"""The OpenAI API's way to the engine: Triton's `tensorrt_llm` model, token ids in and out, over gRPC on loopback.

Each generation is one bidirectional ModelStreamInfer call with one request (streaming, new tokens per response,
`triton_enable_empty_final_response` so the end is always seen; a model that is not decoupled answers once).
Tensors travel as raw little-endian bytes.
A generation left before its final response (a client that disconnected, a stop string found in the text)
cancels its call, which Triton turns into a cancelled request: the engine frees its KV blocks. A call that got
its final response is never cancelled (Triton 2.51 then holds the model at shutdown, see serving/client.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
    """Async client of one `tensorrt_llm` model (make it inside the event loop that uses it)."""

    def __init__(self, grpc_url: str, model: str = "tensorrt_llm"):
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._pb = service_pb2
        self._channel = grpc.aio.insecure_channel(grpc_url, options=GRPC_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self.model = model

    async def close(self) -> None:
        await self._channel.close()

    async def ready(self, timeout_s: float = 2.0) -> bool:
        """Triton's own readiness of the model (no generation)."""
        try:
            reply = await self._stub.ModelReady(self._pb.ModelReadyRequest(name=self.model), timeout=timeout_s)
            return bool(reply.ready)
        except Exception:
            return False

    def _request(self, req: EngineRequest, request_id: str):
        pb = self._pb.ModelInferRequest(model_name=self.model, id=request_id)
        pb.parameters["triton_enable_empty_final_response"].bool_param = True
        for name, arr in req.tensors():
            t = pb.inputs.add(name=name, datatype=_TYPES[arr.dtype.type])
            t.shape.extend(arr.shape)
            pb.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
        pb.outputs.add(name="output_ids")
        if req.generation_logits:
            pb.outputs.add(name="generation_logits")
        if req.log_probs:
            pb.outputs.add(name="output_log_probs")
        return pb

    async def generate(self, req: EngineRequest, request_id: str) -> AsyncIterator[Delta]:
        """The generated tokens as they come; raises InferenceError for an error response."""
        import grpc

        call = self._stub.ModelStreamInfer(iter([self._request(req, request_id)]))
        finished = False
        try:
            async for reply in call:
                finished = bool(reply.error_message)  # an error response is the request's last
                delta = None if finished else _delta(reply.infer_response)
                if finished or delta.final:
                    finished = True
                    await _end(call)
                    if reply.error_message:
                        raise InferenceError(reply.error_message)
                    yield delta
                    return
                yield delta
            if not finished:
                raise InferenceError("the engine's stream ended without a final response")
        except grpc.aio.AioRpcError as e:
            finished = True
            raise InferenceError(f"Triton at loopback gRPC: {e.details() or e.code().name}") from None
        finally:
            if not finished:
                call.cancel()


_ENDING: set = set()  # calls being read to their end (referenced, so they are not collected meanwhile)


async def _end(call) -> None:
    """Read a call that had its last response to its end. grpc cancels a call whose reading task is cancelled or
    that is dropped unfinished, so this reading is shielded from the caller's cancellation."""

    async def drain():
        async for _ in call:
            pass

    task = asyncio.ensure_future(drain())
    _ENDING.add(task)
    task.add_done_callback(_ENDING.discard)
    await asyncio.shield(task)


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
