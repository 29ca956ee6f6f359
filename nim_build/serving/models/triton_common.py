"""Helpers shared by the python models of a nim_build Triton repository (copied next to each model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from nim_build.errors import UserError
from nim_build.serving.tokenizer import META_FILE, REPO_TOKENIZER_DIR, Tokenizer


def parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def is_true(value: str | None, default: bool = False) -> bool:
    if value is None or value == "" or value.startswith("${"):
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def repo_path(args: dict, relative: str) -> Path:
    """A path in the model repository: absolute paths stay, relative ones resolve against the repository root."""
    p = Path(relative)
    return p if p.is_absolute() else Path(args["model_repository"]).resolve().parent / p


def load_tokenizer(args: dict, params: dict[str, str]) -> tuple[Tokenizer, dict]:
    path = repo_path(args, params.get("tokenizer_dir") or REPO_TOKENIZER_DIR)
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return Tokenizer.from_dir(path, meta), meta


def prompt(
    request,
    tok: Tokenizer,
    max_seq_len: int | None,
    *,
    messages: str,
    text_input: str,
    max_tokens: str,
    add_special_tokens: bool = True,
) -> tuple[list[int], int]:
    """Validated (prompt ids, max_tokens) of a request: the chat input (messages) rendered with the model's chat
    template when given, else the text input; names are the request's input names in this model."""
    raw = first(request, messages)
    if raw is not None and text(raw, "messages").strip():
        ids = tok.encode_chat(*parse_messages(text(raw, "messages")))
    else:
        query = text(first(request, text_input, b""), "text_input")
        if not query:
            raise UserError("text_input is empty")
        ids = tok.encode(query, add_special_tokens=add_special_tokens)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    n = int(first(request, max_tokens, 0))
    if n <= 0:
        raise UserError(f"max_tokens must be positive, got {n}")
    if max_seq_len and len(ids) + n > max_seq_len:
        raise UserError(
            f"prompt ({len(ids)} tokens) + max_tokens ({n}) exceeds the engine's max_seq_len ({max_seq_len})"
        )
    return ids, n


def first(request, name: str, default=None):
    """The first element of an optional input of a batch-1 request (default when absent)."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    arr = t.as_numpy()
    if arr.size == 0:
        return default
    if arr.shape and arr.shape[0] != 1:
        raise UserError(f"{name}: send one sequence per request (batch size 1), got batch {arr.shape[0]}")
    return arr.reshape(-1)[0]


def array(request, name: str):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{name} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return str(value)


def strings(request, name: str) -> list[str]:
    arr = array(request, name)
    if arr is None:
        return []
    if arr.ndim > 1 and arr.shape[0] != 1:
        raise UserError(f"{name}: send one sequence per request (batch size 1), got batch {arr.shape[0]}")
    return [text(v, name) for v in arr.reshape(-1)]


def parse_messages(raw: str) -> tuple[list, list | None]:
    """A chat request: a JSON list of messages, or {"messages": [...], "tools": [...]}."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"messages is not valid JSON: {e}") from None
    if isinstance(data, dict):
        return data.get("messages"), data.get("tools")
    return data, None


def error(message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def tensor(name: str, value, dtype) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.asarray(value, dtype=dtype))


def stop_llm_request(llm_model: str, request_id: str) -> None:
    """Cancel the tensorrt_llm request with this id: a `stop` request (TensorRT-LLM backend convention; the
    reference model honours it too), waited for."""
    stop = pb_utils.InferenceRequest(
        model_name=llm_model,
        request_id=request_id,
        requested_output_names=[],
        inputs=[
            tensor("input_lengths", [[1]], np.int32),
            tensor("request_output_len", [[1]], np.int32),
            tensor("stop", [[True]], np.bool_),
        ],
    )
    for _ in stop.exec(decoupled=True):
        pass
