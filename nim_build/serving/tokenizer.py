"""Tokenizer and streaming detokenizer shared by the Triton python models and `nim_build run`.

Two kinds, as recorded in the engine manifest (``manifest["tokenizer"]["kind"]``):

- ``"hf"``: a Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library (chat templates through
  ``transformers``, loaded only when a chat request arrives);
- ``"tekken"``: Mistral's native ``tekken.json`` run by ``mistral-common`` (chat requests, tools included,
  rendered by ``MistralTokenizer.encode_chat_completion``, which emits ``[AVAILABLE_TOOLS]``).

Generated text is always ``decode(generated_ids)`` with special tokens skipped. A ``StreamDecoder`` yields the
same text piece by piece: the concatenation of ``step()`` results and ``flush()`` equals the one-shot decode,
and no piece ever ends inside a UTF-8 character (characters split across tokens are held back until complete).
"""

from __future__ import annotations

import codecs
import json
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nim_build.errors import UserError
from nim_build.jsonfile import read_object

META_FILE = "nim_build_tokenizer.json"  # kind / bos / end / pad ids and limits, written next to the tokenizer files
# Where `nim_build repo` puts the tokenizer, relative to the repository root (inside a version folder, where
# Triton looks for nothing); here so the python models can default to it without importing the generator.
REPO_TOKENIZER_DIR = "preprocessing/1/tokenizer"
KINDS = ("hf", "tekken")
# Every file a tokenizer (and its chat template and special ids) may need: what a build copies and downloads.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tekken.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
TEKKEN_END_ID = 2  # </s> in every Tekken vocabulary


def tokenizer_kind(path: str | os.PathLike) -> str | None:
    """ "tekken" when the directory has tekken.json (mistral-common renders Mistral's chats and tool calls as the
    model was trained), else "hf" for a tokenizer.json, else None."""
    path = Path(path)
    if (path / "tekken.json").is_file():
        return "tekken"
    return "hf" if (path / "tokenizer.json").is_file() else None


def detect_meta(
    path: str | os.PathLike, *, bos_id: int | None = None, end_id: int | list | None = None, pad_id: int | None = None
) -> dict[str, Any] | None:
    """What serving needs to know of the tokenizer in path: kind, bos / end / pad ids and whether it has a chat
    template; None without tokenizer files. The given ids (the model config's) give way to generation_config.json;
    an end id found nowhere else comes from config.json in path, then tokenizer_config.json's eos token."""
    path = Path(path)
    kind = tokenizer_kind(path)
    if kind is None:
        return None
    gen = _json(path / "generation_config.json")
    bos_id = gen.get("bos_token_id", bos_id)
    end_id = _first(gen.get("eos_token_id", end_id))
    pad_id = gen.get("pad_token_id", pad_id)
    tok_cfg = _json(path / "tokenizer_config.json")
    if end_id is None:
        end_id = _first(_json(path / "config.json").get("eos_token_id"))
    if end_id is None:
        eos = tok_cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        end_id = next(
            (int(i) for i, t in (tok_cfg.get("added_tokens_decoder") or {}).items() if t.get("content") == eos), None
        )
    if end_id is None and kind == "tekken":
        end_id = TEKKEN_END_ID
    if end_id is None:
        raise UserError(
            f"cannot tell the end-of-sequence id of the tokenizer in {path}: add eos_token_id to its "
            "generation_config.json"
        )
    chat = bool(tok_cfg.get("chat_template")) or (path / "chat_template.jinja").is_file() or kind == "tekken"
    return {
        "kind": kind,
        "bos_id": bos_id,
        "end_id": int(end_id),
        "pad_id": end_id if pad_id is None else pad_id,
        "chat_template": chat,
    }


def other_end_ids(path: str | os.PathLike, end_id: int) -> list[int]:
    """End ids beyond end_id (Llama 3's <|eot_id|> and <|eom_id|>): generation_config.json's other eos_token_ids,
    the list detect_meta takes end_id from."""
    eos = _json(Path(path) / "generation_config.json").get("eos_token_id")
    return [int(i) for i in eos if int(i) != end_id] if isinstance(eos, list) else []


def _json(path: Path) -> dict:
    return read_object(path) if path.is_file() else {}


def _first(x):
    return x[0] if isinstance(x, list) and x else x


class Tokenizer:
    """Encode, decode, render chats and build stop/bad word lists for one model."""

    def __init__(
        self,
        kind: str,
        path: Path,
        *,
        bos_id: int | None,
        end_id: int,
        pad_id: int | None,
        max_seq_len: int | None = None,
    ):
        if kind not in KINDS:
            raise UserError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind = kind
        self.path = Path(path)
        self.bos_id = bos_id
        self.end_id = int(end_id)
        # Models without a pad token (Llama, SmolLM2) pad with the end id, as TensorRT-LLM does.
        self.pad_id = int(pad_id) if pad_id is not None else self.end_id
        self.max_seq_len = max_seq_len
        self._hf_chat = None
        self._token_bytes: list[bytes] | None = None  # token_text's table, made at its first use
        if kind == "hf":
            import tokenizers

            self._tk = tokenizers.Tokenizer.from_file(str(self.path / "tokenizer.json"))
            self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        else:
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

            self._mistral = MistralTokenizer.from_file(str(self.path / "tekken.json"))
            self._tk = self._mistral.instruct_tokenizer.tokenizer
            self.vocab_size = self._tk.n_words
            n_special = self._tk.num_special_tokens
            model = self._tk._model  # tiktoken Encoding: one bytes piece per regular token
            self._pieces = [b""] * n_special + [
                model.decode_single_token_bytes(i) for i in range(self.vocab_size - n_special)
            ]

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Tokenizer:
        """Load from a tokenizer directory; ids come from `meta` or the directory's nim_build_tokenizer.json."""
        path = Path(path)
        if meta is None:
            meta = _json(path / META_FILE)
        kind = meta.get("kind") or tokenizer_kind(path) or "hf"
        wanted = path / ("tekken.json" if kind == "tekken" else "tokenizer.json")
        if not wanted.is_file():
            raise UserError(f"{wanted} not found: the tokenizer directory {path} has no {kind} tokenizer")
        end_id = meta.get("end_id")
        if end_id is None:
            end_id = detect_meta(path)["end_id"]
        return cls(
            kind,
            path,
            bos_id=meta.get("bos_id"),
            end_id=end_id,
            pad_id=meta.get("pad_id"),
            max_seq_len=meta.get("max_seq_len"),
        )

    @classmethod
    def from_engine_dir(cls, engine_dir: str | os.PathLike) -> Tokenizer:
        from nim_build.builder.manifest import load_manifest

        manifest = load_manifest(engine_dir)
        return cls.from_dir(
            Path(engine_dir) / manifest["tokenizer"].get("dir", "tokenizer"), meta_from_manifest(manifest)
        )

    # -- encode / decode -------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.kind == "hf":
            return self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        return self._tk.encode(text, bos=add_special_tokens, eos=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            return b"".join(self._pieces[i] for i in ids).decode("utf-8", errors="replace")
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self._tk.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)

    def byte_pieces(self) -> tuple[list[bytes], bool] | None:
        """What a decode concatenates, when the decoder is that simple: the bytes of every token id (none for
        special tokens) and whether the decoded text drops its leading space (sentencepiece). Checked against
        this tokenizer's own decode of every token and of sample sequences; None for any other decoder.
        The native postprocessing backend decodes with this table."""
        if self.kind == "tekken":
            return list(self._pieces), False  # decode() is this concatenation by definition
        derived = _hf_byte_pieces(self._tk, json.loads((self.path / "tokenizer.json").read_text()).get("decoder"))
        if derived is None:
            return None
        pieces, strip = derived

        def lossy(ids: list[int]) -> str:
            data = b"".join(pieces[i] for i in ids)
            return (data[1:] if strip and data.startswith(b" ") else data).decode("utf-8", errors="replace")

        samples = [[i] for i in range(len(pieces))]
        samples += [self.encode(t, add_special_tokens=False) for t in _PIECE_CHECK_TEXTS]
        rng = random.Random(0)
        samples += [[rng.randrange(len(pieces)) for _ in range(64)] for _ in range(64)]
        decoded = self._tk.decode_batch(samples, skip_special_tokens=True)
        if any(lossy(ids) != text for ids, text in zip(samples, decoded)):
            return None
        return pieces, strip

    def special_id(self, token: str) -> int | None:
        """The id of a special token such as "[TOOL_CALLS]", or None when the vocabulary has no such token."""
        if self.kind == "tekken":
            try:
                return int(self._tk.get_special_token(token))
            except Exception:  # mistral-common raises its own error for an unknown token
                return None
        i = self._tk.token_to_id(token)
        return None if i is None else int(i)

    def token_text(self, token_id: int) -> tuple[str, bytes]:
        """One token as OpenAI's logprobs show it: its text (special tokens by name) and its exact bytes, where the
        decoder is a byte table (a token may hold part of a character; its text then has U+FFFD)."""
        if self._token_bytes is None:
            table = self.byte_pieces()
            self._token_bytes = table[0] if table is not None else []
        data = self._token_bytes[token_id] if token_id < len(self._token_bytes) else b""
        if data:
            return data.decode("utf-8", errors="replace"), data
        text = self.decode([token_id], skip_special_tokens=False)  # special tokens, other decoders
        return text, text.encode("utf-8")

    def other_end_ids(self) -> list[int]:
        return other_end_ids(self.path, self.end_id)

    def has_chat_template(self) -> bool:
        if self.kind == "tekken":
            return True
        return (self.path / "tokenizer_config.json").is_file() and bool(self._chat_tokenizer().chat_template)

    def renders_tools(self) -> bool:
        """Whether the chat template renders `tools` (mistral-common always does; an HF template must use them)."""
        if self.kind == "tekken":
            return True
        return "tools" in str(self._chat_tokenizer().chat_template or "")

    def stream_decoder(self) -> StreamDecoder:
        """A new incremental decoder for one sequence of generated ids."""
        if self.kind == "hf":
            return _HFStreamDecoder(self)
        return _ByteStreamDecoder(self._pieces)

    # -- chat ------------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render OpenAI-style messages (and tools) with the model's chat template, ready for generation."""
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise UserError("messages must be a non-empty list of {role, content} objects")
        if self.kind == "tekken":
            from mistral_common.protocol.instruct.request import ChatCompletionRequest

            try:
                request = ChatCompletionRequest.from_openai(messages, tools=tools or None)
                return list(self._mistral.encode_chat_completion(request).tokens)
            except Exception as e:  # mistral-common raises pydantic / its own validation errors
                raise UserError(f"invalid chat request: {e}") from e
        tok = self._chat_tokenizer()
        if not tok.chat_template:
            raise UserError(f"the tokenizer in {self.path} has no chat template; send plain text instead")
        try:
            text = tok.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja errors: unsupported roles, alternation rules...
            raise UserError(f"the chat template rejected the messages: {e}") from e
        return self.encode(text, add_special_tokens=False)

    def load_chat_template(self) -> None:
        """Load what encode_chat needs now rather than at the first chat (transformers, for an HF template)."""
        if self.kind == "hf" and (self.path / "tokenizer_config.json").is_file():
            self._chat_tokenizer()

    def _chat_tokenizer(self):
        if self._hf_chat is None:
            from transformers import AutoTokenizer

            self._hf_chat = AutoTokenizer.from_pretrained(str(self.path))
        return self._hf_chat

    # -- stop / bad words ------------------------------------------------------------------------------------
    def words_to_ids(self, words: Iterable[str]) -> list[list[int]]:
        """Each word (stop or bad word) as a token-id list, encoded without special tokens; empty words dropped."""
        return [ids for ids in (self.encode(w, add_special_tokens=False) for w in words if w) if ids]


def to_word_list_format(word_ids: list[list[int]]) -> np.ndarray:
    """TensorRT-LLM's [2, L] words tensor: row 0 the flattened ids (0-padded), row 1 the end offsets (-1-padded)."""
    flat = [i for ids in word_ids for i in ids]
    offsets = np.cumsum([len(ids) for ids in word_ids]).tolist()
    width = max(len(flat), len(offsets), 1)
    out = np.zeros((2, width), dtype=np.int32)
    out[1, :] = -1
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    return out


def from_word_list_format(arr: np.ndarray, name: str = "word list") -> list[list[int]]:
    """Inverse of to_word_list_format: a [2, L] array (or [1, 2, L]). Offsets must increase and stay within the
    row (the first -1 ends them): a malformed list is an error, never a silently different set of words."""
    arr = np.asarray(arr)
    if arr.size == 0:
        return []
    if arr.ndim not in (2, 3) or arr.shape[-2] != 2 or (arr.ndim == 3 and arr.shape[0] != 1):
        raise UserError(f"{name} must be shaped [2, L] (ids row, end offsets row), got {list(arr.shape)}")
    arr = arr.reshape(2, -1)
    words, start = [], 0
    for end in arr[1].tolist():
        if end < 0:
            break
        if not start < end <= arr.shape[1]:
            raise UserError(f"{name}: end offsets must increase and be at most {arr.shape[1]}, got {end} after {start}")
        words.append([int(i) for i in arr[0, start:end]])
        start = int(end)
    return words


class StreamDecoder(ABC):
    """Incremental detokenizer: `step(new_ids)` returns the text that is complete so far, `flush()` the rest."""

    @abstractmethod
    def step(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def flush(self) -> str: ...


class _HFStreamDecoder(StreamDecoder):
    """tokenizers.decoders.DecodeStream (Rust prefix-offset decoding) plus an exact end-of-stream flush."""

    def __init__(self, tok: Tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0  # characters emitted so far

    def step(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        self._ids.extend(ids)
        # One id at a time: given a list, DecodeStream holds the whole list back when its last token ends
        # inside a character; per id it holds back only that character's tokens.
        step, tk = self._stream.step, self._tok._tk
        piece = "".join(filter(None, [step(tk, i) for i in ids]))
        self._emitted += len(piece)
        return piece

    def flush(self) -> str:
        # Bytes still held back (an incomplete character at the very end) decode as U+FFFD in a one-shot
        # decode too: emit whatever the full decode has beyond what was already streamed.
        full = self._tok.decode(self._ids)
        rest = full[self._emitted :]
        self._emitted = len(full)
        return rest


class _ByteStreamDecoder(StreamDecoder):
    """Byte-level tokens (Tekken): concatenate each token's bytes, emit only complete UTF-8 characters."""

    def __init__(self, pieces: list[bytes]):
        self._pieces = pieces
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, ids: Sequence[int]) -> str:
        return self._utf8.decode(b"".join(self._pieces[int(i)] for i in ids))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


_PIECE_CHECK_TEXTS = (" Hello world", "  two  spaces\tand\ttabs\n", "中文分词 한국어 مرحبا 🙂👍🏽", "x = f(y)  # ok")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character that stands for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _hf_byte_pieces(tk, decoder: dict | None) -> tuple[list[bytes], bool] | None:
    """Candidate byte pieces for byte-level BPE decoders (GPT-2, Llama 3, Mistral NeMo's tokenizer.json) and for
    sentencepiece decoders without byte fallback (Metaspace, or Replace("▁", " ") [+ Fuse, Strip]); Tokenizer.
    byte_pieces checks them. None for any other decoder, ByteFallback included: it decodes a malformed run of
    <0x..> tokens as one U+FFFD per token, which no byte table reproduces (Llama 2, Mistral 7B)."""
    kind = (decoder or {}).get("type")
    steps = [d.get("type") for d in decoder.get("decoders", [])] if kind == "Sequence" else []
    strip = False
    if kind == "ByteLevel":
        table = _byte_level_decoder()

        def piece(token: str) -> bytes:
            if all(c in table for c in token):
                return bytes(table[c] for c in token)
            return token.encode("utf-8")  # added tokens outside the byte alphabet decode as their text
    elif kind == "Metaspace" or (kind == "Sequence" and set(steps) <= {"Replace", "Fuse", "Strip"}):
        if kind == "Metaspace":
            replacement = decoder.get("replacement", "▁")
            strip = decoder.get("prepend_scheme", "always") != "never" and decoder.get("add_prefix_space", True)
        else:
            replaces = [d for d in decoder["decoders"] if d["type"] == "Replace"]
            if len(replaces) != 1 or replaces[0].get("content") != " ":
                return None
            replacement = replaces[0]["pattern"].get("String")
            strips = [d for d in decoder["decoders"] if d["type"] == "Strip"]
            if strips and (strips[0].get("content") != " " or strips[0].get("start") != 1 or strips[0].get("stop")):
                return None
            strip = bool(strips)
        if not replacement:
            return None

        def piece(token: str) -> bytes:
            return token.replace(replacement, " ").encode("utf-8")
    else:
        return None
    special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    n = tk.get_vocab_size(with_added_tokens=True)
    tokens = [tk.id_to_token(i) for i in range(n)]
    if any(t is None for t in tokens):
        return None  # holes in the id space
    return [b"" if i in special else piece(t) for i, t in enumerate(tokens)], strip


def meta_from_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer facts the serving side needs, from an engine manifest."""
    tok = manifest.get("tokenizer") or {}
    build = manifest.get("build") or {}
    return {
        "kind": tok.get("kind"),
        "bos_id": tok.get("bos_id"),
        "end_id": tok.get("end_id"),
        "pad_id": tok.get("pad_id"),
        "chat_template": tok.get("chat_template"),
        "max_seq_len": build.get("max_seq_len"),
        "max_batch_size": build.get("max_batch_size"),
        "vocab_size": (manifest.get("spec") or {}).get("vocab_size"),  # the model's (embedding_bias' length)
    }
