"""Helpers shared by the python models of a nim_build Triton repository (copied next to each model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from nim_build.errors import UserError
from nim_build.tokenizer import META_FILE, Tokenizer


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
    path = repo_path(args, params.get("tokenizer_dir") or "preprocessing/1/tokenizer")
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return Tokenizer.from_dir(path, meta), meta


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


def tensor(name: str, value, dtype) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.asarray(value, dtype=dtype))
