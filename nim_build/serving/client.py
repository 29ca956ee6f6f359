"""Client for a nim_build (or tensorrtllm_backend) Triton repository: `ensemble` or `tensorrt_llm_bls`.

gRPC always goes through the bidirectional stream API: a decoupled model (and any ensemble holding one)
refuses unary ModelInfer, so one-shot requests are sent on the stream with `stream=false` and arrive as one
response. HTTP uses the generate extension: `generate` for one-shot, `generate_stream` (server-sent events)
for streaming. Each request carries a unique request id (the ensemble's postprocessing keys its streaming
detokenizer on it).
"""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nim_build.errors import InferenceError, ResponseTimeout, UserError
from nim_build.serving.repo import ENSEMBLE_INPUTS

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


@dataclass
class GenerateRequest:
    prompt: str | None = None
    messages: list | None = None
    tools: list | None = None
    max_tokens: int = 64
    stream: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def fields(self) -> dict[str, Any]:
        """The ensemble's inputs as a JSON-able dict (the HTTP generate body)."""
        if (self.prompt is None) == (self.messages is None):
            raise UserError("give exactly one of a prompt or messages")
        body: dict[str, Any] = {"text_input": self.prompt or "", "max_tokens": self.max_tokens, "stream": self.stream}
        body["exclude_input_in_output"] = True  # the completion only, whatever the repository's default
        if self.messages is not None:
            body["messages"] = json.dumps(
                {"messages": self.messages, "tools": self.tools} if self.tools else self.messages
            )
        for key in ("temperature", "top_k", "top_p", "seed"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        if self.stop:
            body["stop_words"] = list(self.stop)
        if self.bad_words:
            body["bad_words"] = list(self.bad_words)
        return body


@dataclass
class GenerateResult:
    text: str
    chunks: list[str]
    request_id: str
    model: str
    time_to_first_chunk_s: float | None
    latency_s: float

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "request_id": self.request_id,
            "text_output": self.text,
            "chunks": self.chunks,
            "time_to_first_chunk_s": self.time_to_first_chunk_s,
            "latency_s": self.latency_s,
        }


# the ensemble's input types, from the repository's own declaration (Triton's names: STRING is BYTES on the wire)
_DTYPES = {name: "BYTES" if t == "TYPE_STRING" else t.removeprefix("TYPE_") for name, t, *_ in ENSEMBLE_INPUTS}
_NUMPY = {"BYTES": np.object_, "INT32": np.int32, "BOOL": np.bool_, "FP32": np.float32, "UINT64": np.uint64}


def grpc_inputs(body: dict[str, Any]):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in body.items():
        dtype = _DTYPES[name]
        values = value if isinstance(value, list) else [value]
        if dtype == "BYTES":
            values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        arr = np.array([values], dtype=_NUMPY[dtype])
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


class Client:
    def __init__(
        self, url: str | None = None, protocol: str = "grpc", model: str = "ensemble", timeout_s: float = 300.0
    ):
        if protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.timeout_s = timeout_s

    def generate(self, req: GenerateRequest, on_chunk: Callable[[str], None] | None = None) -> GenerateResult:
        """Send one request; `on_chunk` sees each piece of text as it arrives (streaming or not)."""
        t0 = time.monotonic()
        first: list[float] = []
        chunks: list[str] = []

        def take(piece: str) -> None:
            if not first:
                first.append(time.monotonic() - t0)
            chunks.append(piece)
            if on_chunk is not None and piece:
                on_chunk(piece)

        if self.protocol == "grpc":
            self._grpc(req, take)
        else:
            self._http(req, take)
        return GenerateResult(
            "".join(chunks), chunks, req.request_id, self.model, first[0] if first else None, time.monotonic() - t0
        )

    # -- gRPC ------------------------------------------------------------------------------------------------
    def _grpc(self, req: GenerateRequest, take: Callable[[str], None]) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        finished = False
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            client.async_stream_infer(
                self.model,
                grpc_inputs(req.fields()),
                request_id=req.request_id,
                outputs=[grpcclient.InferRequestedOutput("text_output")],
                enable_empty_final_response=True,
            )
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    result, error = results.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise ResponseTimeout(
                        f"no response from {self.model} at {self.url} within {self.timeout_s:.0f} s"
                    ) from None
                if error is not None:
                    raise InferenceError(f"{self.model}: {_message(error)}")
                out = result.as_numpy("text_output")
                if out is not None:
                    for piece in out.reshape(-1):
                        take(piece.decode("utf-8") if isinstance(piece, bytes) else str(piece))
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    finished = True
                    return
        except InferenceServerException as e:
            finished = True
            raise InferenceError(f"{self.model} at {self.url}: {_message(e)}") from None
        finally:
            # Cancel only an unfinished stream: cancelling one that already had its final response leaves Triton
            # 2.51 holding the model, which then cannot unload at shutdown (tests/test_serve.py).
            # (an ensemble's postprocessing turns the cancellation into a stop for tensorrt_llm)
            client.stop_stream(cancel_requests=not finished)
            client.close()

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _http(self, req: GenerateRequest, take: Callable[[str], None]) -> None:
        endpoint = "generate_stream" if req.stream else "generate"
        body = req.fields()
        body["id"] = req.request_id
        http_req = urllib.request.Request(
            f"http://{self.url}/v2/models/{self.model}/{endpoint}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(http_req, timeout=self.timeout_s) as resp:
                if not req.stream:
                    take(_http_text(json.loads(resp.read())))
                    return
                for raw in resp:  # server-sent events: "data: {json}" lines
                    line = raw.decode("utf-8").strip()
                    if line.startswith("data:"):
                        take(_http_text(json.loads(line[5:])))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace").strip()
            detail = detail[5:].strip() if detail.startswith("data:") else detail  # generate_stream's error event
            try:
                detail = json.loads(detail).get("error", detail)
            except json.JSONDecodeError:
                pass
            raise InferenceError(f"{self.model}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise InferenceError(f"cannot reach Triton at {self.url}: {e.reason}") from None


def _http_text(data: dict) -> str:
    if "error" in data:
        raise InferenceError(str(data["error"]))
    value = data.get("text_output", "")
    return "".join(value) if isinstance(value, list) else str(value)


def _message(error) -> str:
    msg = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return " ".join(str(msg).split())


def health_probe(grpc_url: str, repo, timeout_s: float = 30.0) -> Callable[[], None]:
    """A check that sends a real one-token request through every LLM entry point of the repository.

    Triton keeps answering ready after a python stub crashed; only a request shows it. For a repository that is
    not an LLM repository the probe asks whether each model is ready.
    """
    from pathlib import Path

    from nim_build.serving.repo import read_config

    entry_points, models = [], []
    for cfg_path in sorted(Path(repo).glob("*/config.pbtxt")):
        cfg = read_config(cfg_path)
        models.append(cfg.name)
        if cfg.platform == "ensemble" or cfg.name == "tensorrt_llm_bls":
            entry_points.append(cfg.name)

    def probe() -> None:
        if entry_points:
            for model in entry_points:
                Client(grpc_url, "grpc", model, timeout_s=timeout_s).generate(
                    GenerateRequest(prompt="ping", max_tokens=1)
                )
            return
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(grpc_url)
        try:
            for model in models:
                if not client.is_model_ready(model):
                    raise InferenceError(f"model {model} is not ready")
        finally:
            client.close()

    return probe
