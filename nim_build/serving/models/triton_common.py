"""Helpers shared by the python models of a nim_build Triton repository (copied next to each model.py)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from nim_build.errors import UserError
from nim_build.serving.tokenizer import META_FILE, REPO_TOKENIZER_DIR, Tokenizer, to_word_list_format


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
    b: int = 0,
) -> tuple[list[int], int]:
    """Validated (prompt ids, max_tokens) of row b of a request: the chat input (messages) rendered with the
    model's chat template when given, else the text input; names are the request's input names in this model."""
    raw = row(request, messages, b)
    if raw is not None and text(raw, "messages").strip():
        ids = tok.encode_chat(*parse_messages(text(raw, "messages")))
    else:
        query = text(row(request, text_input, b, b""), "text_input")
        if not query:
            raise UserError("text_input is empty")
        ids = tok.encode(query, add_special_tokens=add_special_tokens)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    n = int(row(request, max_tokens, b, 0))
    if n <= 0:
        raise UserError(f"max_tokens must be positive, got {n}")
    if max_seq_len and len(ids) + n > max_seq_len:
        raise UserError(
            f"prompt ({len(ids)} tokens) + max_tokens ({n}) exceeds the engine's max_seq_len ({max_seq_len})"
        )
    return ids, n


def batch_size(request, *names: str) -> int:
    """The request's batch size: the first dimension of the first of `names` it carries."""
    for name in names:
        arr = array(request, name)
        if arr is not None and arr.ndim:
            return int(arr.shape[0])
    return 1


def row_of(arr: np.ndarray, b: int, name: str) -> np.ndarray:
    """Row b of a [batch, ...] array; a single row serves every row of the request."""
    if arr.shape[0] == 1:
        return arr[0]
    if b >= arr.shape[0]:
        raise UserError(f"{name} has {arr.shape[0]} rows; the request has more")
    return arr[b]


def row(request, name: str, b: int, default=None):
    """Row b's value of an optional [batch, 1] input, or default when absent."""
    arr = array(request, name)
    if arr is None or arr.size == 0:
        return default
    value = row_of(arr.reshape(arr.shape[0], -1) if arr.ndim else arr.reshape(1, 1), b, name)[0]
    return value.item() if isinstance(value, np.generic) else value


def first(request, name: str, default=None):
    """The first element of an optional input (default when absent)."""
    return row(request, name, 0, default)


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


def strings(request, name: str, b: int = 0) -> list[str]:
    """Row b's strings of an optional [batch, n] string input."""
    arr = array(request, name)
    if arr is None or arr.size == 0:
        return []
    arr = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
    return [text(v, name) for v in row_of(arr, b, name)]


def word_lists(tok: Tokenizer, request, name: str, rows: int) -> np.ndarray:
    """[rows, 2, L]: each row's words (a [batch, n] string input) in TensorRT-LLM's word-list format, padded."""
    lists = [to_word_list_format(tok.words_to_ids(strings(request, name, b))) for b in range(rows)]
    width = max(w.shape[1] for w in lists)
    out = np.zeros((rows, 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for b, w in enumerate(lists):
        out[b, :, : w.shape[1]] = w
    return out


def embedding_bias(tok: Tokenizer, vocab_size: int, request, rows: int, words: str, weights: str) -> np.ndarray:
    """[rows, vocab]: each weight added to every token of its word (upstream's rule; the word is encoded without
    special tokens), or [rows, 0] without bias words."""
    given = array(request, weights)
    if given is None or not any(strings(request, words, b) for b in range(rows)):
        return np.zeros((rows, 0), dtype=np.float32)
    given = given.reshape(given.shape[0], -1)
    bias = np.zeros((rows, vocab_size), dtype=np.float32)
    for b in range(rows):
        row_words, row_weights = strings(request, words, b), row_of(given, b, weights)
        if len(row_words) != len(row_weights):
            raise UserError(
                f"{words} has {len(row_words)} words but {weights} {len(row_weights)} weights; give one weight per word"
            )
        for word, weight in zip(row_words, row_weights):
            for i in tok.encode(word, add_special_tokens=False):
                if 0 <= i < vocab_size:
                    bias[b, i] += weight
    return bias


def parse_messages(raw: str) -> tuple[list, list | None]:
    """A chat request: a JSON list of messages, or {"messages": [...], "tools": [...]}."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"messages is not valid JSON: {e}") from None
    if isinstance(data, dict):
        return data.get("messages"), data.get("tools")
    return data, None


def error(message: str, code=None):
    """An error response; `code` one of pb_utils.TritonError's (default INTERNAL)."""
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def error_message(e: BaseException, model: str) -> str:
    """What a client is told about a failed request: the reason for a bad request; for anything else only that
    the server failed (the traceback, with the server's paths, goes to the server's log)."""
    if isinstance(e, RecursionError):
        return "the request is nested too deeply"
    if isinstance(e, (UserError, ValueError, TypeError)):
        return str(e)
    pb_utils.Logger.log_error(f"{model}: {''.join(traceback.format_exception(e))}")
    return f"{model}: internal error ({type(e).__name__}); the server's log has the details"


def tensor(name: str, value, dtype) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.asarray(value, dtype=dtype))


def stop_llm_request(llm_model: str, request_id: str, stream_key: int | None = None) -> None:
    """Cancel a tensorrt_llm request: a `stop` request (TensorRT-LLM backend convention) for the requests with
    this id, or for the one stream with this key (an ensemble's streams answer only to their key), waited for."""
    inputs = [
        tensor("input_lengths", [[0]], np.int32),
        tensor("request_output_len", [[0]], np.int32),
        tensor("stop", [[True]], np.bool_),
    ]
    if stream_key is not None:
        inputs.append(tensor("stream_key", [[stream_key]], np.uint64))
    stop = pb_utils.InferenceRequest(
        model_name=llm_model, request_id=request_id, requested_output_names=[], inputs=inputs
    )
    for _ in stop.exec(decoupled=True):
        pass
