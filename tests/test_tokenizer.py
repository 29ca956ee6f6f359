"""nim_build.serving.tokenizer: encode/decode, chat rendering, word lists and streaming detokenization (no server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nim_build.errors import UserError
from nim_build.serving.tokenizer import META_FILE, Tokenizer, from_word_list_format, to_word_list_format

MULTILINGUAL = [
    "The capital of France is Paris.  Two  spaces, then\nnewline.",
    "中文分词测试：我们今天去北京大学参观。",
    "한국어 텍스트입니다. 안녕하세요, 반갑습니다!",
    "مرحبا بالعالم، هذا نص عربي للاختبار.",
    "Emoji: 🙂👍🏽👨‍👩‍👧‍👦 🇫🇷 done",
    "def f(x):\n\tif x:\n\t\treturn '\\t'  # tabs\n\treturn None\n",
    "mixed 日本語 and ελληνικά and ру́сский, ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(default_model_dir, tmp_path_factory) -> Path:
    """The default model's (SmolLM2) byte-level BPE tokenizer.json + chat template; it has no pad token."""
    out = tmp_path_factory.mktemp("hf_tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir / name, out / name)
    (out / META_FILE).write_text(json.dumps({"kind": "hf", "bos_id": None, "end_id": 2, "pad_id": None}))
    return out


@pytest.fixture(scope="session", params=["hf", "tekken"])
def tok(request, hf_tokenizer_dir, tekken_dir) -> Tokenizer:
    return Tokenizer.from_dir(hf_tokenizer_dir if request.param == "hf" else tekken_dir)


def _stream(tok: Tokenizer, ids: list[int], chunk: int) -> list[str]:
    dec = tok.stream_decoder()
    pieces = [dec.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(dec.flush())
    return pieces


@pytest.mark.parametrize("text", MULTILINGUAL)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_equals_one_shot(tok, text, chunk):
    ids = tok.encode(text, add_special_tokens=False)
    pieces = _stream(tok, ids, chunk)
    assert "".join(pieces) == tok.decode(ids) == text
    for p in pieces:  # never a broken character: every piece is clean UTF-8 without replacement characters
        assert "\ufffd" not in p
        p.encode("utf-8")


def test_split_characters_are_held_back(tok):
    """A character whose bytes span several tokens is emitted once, whole, by the token that completes it."""
    text = "🙂"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) >= 2, "the emoji must span several byte-level tokens for this test to mean anything"
    dec = tok.stream_decoder()
    pieces = [dec.step([i]) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == text


def test_stream_of_random_ids_matches_one_shot(tok):
    """Arbitrary generated ids (incomplete characters, special tokens) still stream to the one-shot decode."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(tok.vocab_size, 60000), size=400).tolist() + [tok.end_id]
    assert "".join(_stream(tok, ids, 1)) == tok.decode(ids)
    assert "".join(_stream(tok, ids, 7)) == tok.decode(ids)


def test_special_tokens_skipped_and_ids(tok):
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.decode(ids + [tok.end_id]) == "hello world"
    assert tok.pad_id is not None and tok.end_id is not None


def test_no_pad_token_falls_back_to_end_id(hf_tokenizer_dir):
    assert Tokenizer.from_dir(hf_tokenizer_dir).pad_id == 2


def test_words_lists_roundtrip(tok):
    words = tok.words_to_ids(["\n\n", "User:", ""])
    assert len(words) == 2 and all(words)
    arr = to_word_list_format(words)
    assert arr.shape[0] == 2 and arr.dtype == np.int32
    assert from_word_list_format(arr) == words
    assert from_word_list_format(to_word_list_format([])) == []


def test_chat_hf(hf_tokenizer_dir):
    tok = Tokenizer.from_dir(hf_tokenizer_dir)
    ids = tok.encode_chat([{"role": "user", "content": "Hi there"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert "Hi there" in text and text.rstrip().endswith("assistant")


def test_chat_tekken_with_tools(tekken_dir):
    tok = Tokenizer.from_dir(tekken_dir)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    ids = tok.encode_chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools)
    text = tok.decode(ids, skip_special_tokens=False)
    assert ids[0] == 1
    assert "[AVAILABLE_TOOLS]" in text and "get_weather" in text and "[INST]" in text and "Weather in Paris?" in text


def test_chat_rejects_bad_messages(tok):
    with pytest.raises(UserError):
        tok.encode_chat([])
    with pytest.raises(UserError):
        tok.encode_chat("hello")  # type: ignore[arg-type]
