"""Calibration and evaluation text -> a fixed [n, seq_len] batch of token ids (no padding, no masks)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from nim_build.errors import UserError


def load_texts(path: str | Path | None = None) -> list[str]:
    """One text per line: the user's file, or the small built-in multilingual set."""
    if path is None:
        raw = resources.files("nim_build.data").joinpath("calibration.txt").read_text(encoding="utf-8")
        return [line.replace("\\n", "\n") for line in raw.splitlines() if line.strip()]
    p = Path(path)
    if not p.is_file():
        raise UserError(f"calibration/evaluation file {path} does not exist (expected one text per line)")
    texts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UserError(f"{path} has no text (expected one text per line)")
    return texts


def token_batch(
    tokenizer, num_samples: int, seq_len: int, path: str | Path | None = None, separator_id: int | None = None
) -> torch.Tensor:
    """Concatenate the encoded texts and cut them into num_samples rows of seq_len tokens.

    When the texts are too short, the stream is reused from a shifted start so rows are not identical.
    """
    stream: list[int] = []
    for text in load_texts(path):
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        if separator_id is not None:
            stream.append(separator_id)
    if not stream:
        raise UserError(f"{path or 'the built-in text'} encodes to no tokens with this model's tokenizer")
    if len(stream) < seq_len:
        stream = stream * (seq_len // len(stream) + 1)
    rows, start = [], 0
    for _ in range(num_samples):
        if start + seq_len > len(stream):
            start = (start + 7) % max(len(stream) - seq_len, 1)
        rows.append(stream[start : start + seq_len])
        start += seq_len
    return torch.tensor(rows, dtype=torch.long)
