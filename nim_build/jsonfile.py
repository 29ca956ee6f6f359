"""Reading the JSON files of a checkpoint (config, index, tokenizer and generation configs) that someone else wrote."""

from __future__ import annotations

import json
from pathlib import Path

from nim_build.errors import CheckpointError


def read_object(path: Path) -> dict:
    """The JSON object in path; anything else (not UTF-8, not JSON, nested too deep, not an object) is one
    CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; re-download it") from None
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else f"not valid JSON ({e})"
        raise CheckpointError(f"{path} is {why}; re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; re-download it")
    return data
