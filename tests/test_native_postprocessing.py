"""The native postprocessing backend (nim_build/native/detokenizer.cc) in a real Triton server.

Compared with two independent references: the tokenizer library's own one-shot decode (HF `tokenizers`,
mistral-common's Tekken), and the python postprocessing model served beside it on the same requests, for
byte-level BPE (the default model, SmolLM2), Tekken, and a sentencepiece-style Metaspace tokenizer built here
with the tokenizers library (its decode drops the leading space). A Llama-2-style one (Replace("▁", " "),
ByteFallback, Fuse, Strip) checks that decoders a byte table cannot reproduce get the python model.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_tokenizer_dir, tokenizer_engine_dir

from nim_build.errors import UserError
from nim_build.serving import native
from nim_build.serving.repo import RepoOptions, generate_repo, read_config, write_config
from nim_build.serving.tokenizer import META_FILE, Tokenizer
from nim_build.testing.trivial_engine import ENGINE_CLASS as TRIVIAL_ENGINE

TEXTS = [
    "北京大学 한국어 مرحبا 🙂👍🏽\tdef f(x):\n\treturn x  # two  spaces",
    " leading space, the end.",
    "the cat sat on the mat",
]


KINDS = ("hf", "tekken", "metaspace")


def _sentencepiece_vocab(byte_tokens: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    if byte_tokens:
        vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in list("▁abcdefghijklmnopqrstuvwxyz,.") + ["▁t", "he", "▁the", "▁c", "at", "▁cat"]:
        vocab.setdefault(piece, len(vocab))
    return vocab, [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "t"), ("▁c", "at")]


def _save(tk, out: Path, bos_id: int, end_id: int) -> Path:
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    out.mkdir(parents=True)
    tk.save(str(out / "tokenizer.json"))
    (out / META_FILE).write_text(json.dumps({"kind": "hf", "bos_id": bos_id, "end_id": end_id, "pad_id": None}))
    return out


def llama2_dir(out: Path) -> Path:
    """What transformers' LlamaConverter writes for Llama 2 / Mistral 7B, with a small vocabulary: most
    characters fall back to <0x..> byte tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab, merges = _sentencepiece_vocab(byte_tokens=True)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _save(tk, out, 1, 2)


def metaspace_dir(out: Path) -> Path:
    """A sentencepiece-style tokenizer with the Metaspace pre-tokenizer and decoder (prepend_scheme "first":
    a decode drops the space the first token starts with); characters outside its vocabulary are <unk>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab, merges = _sentencepiece_vocab(byte_tokens=False)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return _save(tk, out, 1, 2)


@pytest.fixture(scope="module")
def tokenizer_dirs(default_model_dir, tmp_path_factory) -> dict[str, Path]:
    import mistral_common

    root = tmp_path_factory.mktemp("tokenizers")
    hf = hf_tokenizer_dir(default_model_dir, root / "hf", bos_id=1)
    tekken = root / "tekken"
    tekken.mkdir()
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240718.json", tekken / "tekken.json")
    (tekken / META_FILE).write_text(json.dumps({"kind": "tekken", "bos_id": 1, "end_id": 2, "pad_id": 11}))
    return {
        "hf": hf,
        "tekken": tekken,
        "metaspace": metaspace_dir(root / "metaspace"),
        "llama2": llama2_dir(root / "llama2"),
    }


def test_byte_pieces_match_each_tokenizer(tokenizer_dirs):
    for kind, strip in (("hf", False), ("tekken", False), ("metaspace", True)):
        tok = Tokenizer.from_dir(tokenizer_dirs[kind])
        pieces, got_strip = tok.byte_pieces()
        assert len(pieces) == tok.vocab_size and got_strip is strip, kind
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=True)
            data = b"".join(pieces[i] for i in ids)
            data = data[1:] if strip and data.startswith(b" ") else data
            assert data.decode("utf-8") == tok.decode(ids), (kind, text)
        assert pieces[tok.end_id] == b""  # special tokens decode to nothing
    meta = Tokenizer.from_dir(tokenizer_dirs["metaspace"])
    the, cat = meta._tk.token_to_id("▁the"), meta._tk.token_to_id("▁cat")
    assert meta.decode([the, cat]) == "the cat" and meta.decode([cat, the]) == "cat the"  # the first space goes


def test_byte_fallback_is_not_a_byte_table(tokenizer_dirs, tmp_path):
    """HF's ByteFallback decodes a malformed run of <0x..> tokens as one U+FFFD per token (not per maximal
    invalid subpart, as UTF-8 decoding does), so such models (Llama 2, Mistral 7B) get the python postprocessing."""
    tok = Tokenizer.from_dir(tokenizer_dirs["llama2"])
    ids = tok.encode(TEXTS[0], add_special_tokens=True)
    assert ids.count(3 + 0xF0) >= 2 and tok.decode(ids) == TEXTS[0]  # emoji as byte tokens, round trip
    assert tok.decode([3 + 0xE4, 3 + 0xB8, 3 + 0x41]) == "\ufffd" * 3  # UTF-8 decoding would give "\ufffdA"
    assert tok.byte_pieces() is None
    repo = generate_repo(tokenizer_engine_dir(tmp_path, tokenizer_dirs["llama2"]), tmp_path / "repo")
    assert read_config(repo / "postprocessing" / "config.pbtxt").backend == "python"


def test_other_decoders_get_the_python_postprocessing(tokenizer_dirs, tmp_path, capsys):
    """A decoder that is not a concatenation of token bytes (WordPiece's ## joining) is refused for native and
    falls back to python under auto."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    wp = tmp_path / "wordpiece"
    wp.mkdir()
    tk = HFTokenizer(models.WordPiece({"[UNK]": 0, "[SEP]": 1, "hello": 2, "##lo": 3, "world": 4}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tk.save(str(wp / "tokenizer.json"))
    (wp / META_FILE).write_text(json.dumps({"kind": "hf", "bos_id": None, "end_id": 1, "pad_id": None}))
    assert Tokenizer.from_dir(wp).byte_pieces() is None
    eng = tokenizer_engine_dir(tmp_path, wp)
    with pytest.raises(UserError, match="--postprocessing python"):
        generate_repo(eng, tmp_path / "r1", RepoOptions(postprocessing="native"))
    repo = generate_repo(eng, tmp_path / "r2")
    assert read_config(repo / "postprocessing" / "config.pbtxt").backend == "python"
    assert "postprocessing runs in python" in capsys.readouterr().err
    repo = generate_repo(tokenizer_engine_dir(tmp_path, tokenizer_dirs["hf"]), tmp_path / "r3")
    assert read_config(repo / "postprocessing" / "config.pbtxt").backend == native.BACKEND
    assert {p.name for p in (repo / "postprocessing" / "1").iterdir()} == {native.LIBRARY, native.TABLE_FILE}


def test_unwritable_cache_falls_back_or_is_one_clear_line(tokenizer_dirs, tmp_path, monkeypatch, capsys):
    """An image's prebuilt library folder is read-only for the pod's user: a build that cannot write its cache
    falls back to python (auto) or says what to do (native); never a traceback. (A folder under a regular file
    is unwritable even for root, who runs these tests.)"""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("NIM_BUILD_NATIVE_DIR", str(blocker / "native"))
    eng = tokenizer_engine_dir(tmp_path, tokenizer_dirs["hf"])
    with pytest.raises(UserError, match="NIM_BUILD_NATIVE_DIR") as e:
        generate_repo(eng, tmp_path / "r1", RepoOptions(postprocessing="native"))
    assert "\n" not in str(e.value)
    repo = generate_repo(eng, tmp_path / "r2")
    assert read_config(repo / "postprocessing" / "config.pbtxt").backend == "python"
    assert "NIM_BUILD_NATIVE_DIR" in capsys.readouterr().err


def test_missing_compiler_is_one_clear_line(tokenizer_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("NIM_BUILD_NATIVE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    eng = tokenizer_engine_dir(tmp_path, tokenizer_dirs["hf"])
    with pytest.raises(UserError) as e:
        generate_repo(eng, tmp_path / "r", RepoOptions(postprocessing="native"))
    assert "\n" not in str(e.value) and "--postprocessing python" in str(e.value)
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def served(tokenizer_dirs, tmp_path_factory):
    """One server: the full repository of a trivial engine with the default model's tokenizer, plus a native and
    a python postprocessing model per tokenizer (post_<kind>_<native|python>)."""
    from conftest import serving

    root = tmp_path_factory.mktemp("native-post")
    repo = generate_repo(
        tokenizer_engine_dir(root, tokenizer_dirs["hf"]), root / "repo", RepoOptions(engine_class=TRIVIAL_ENGINE)
    )
    for kind in KINDS:
        tok_dir = tokenizer_dirs[kind]
        for impl in ("native", "python"):
            work = root / f"{kind}-{impl}"
            src = generate_repo(
                tokenizer_engine_dir(work, tok_dir),
                work / "repo",
                RepoOptions(postprocessing=impl, engine_class=TRIVIAL_ENGINE),
            )
            name = f"post_{kind}_{impl}"
            shutil.copytree(src / "postprocessing", repo / name)
            cfg = read_config(repo / name / "config.pbtxt")
            cfg.name = name
            if impl == "python":
                shutil.copytree(tok_dir, repo / name / "1" / "tokenizer")
                cfg.parameters["tokenizer_dir"].string_value = f"{name}/1/tokenizer"
            write_config(cfg, repo / name / "config.pbtxt")
    with serving(repo, root, root / "serve.log") as server:
        yield server


def _post(client, model, rows: list[list[int]], request_id: str = "") -> list[str]:
    import tritonclient.grpc as grpcclient

    width = max(1, max(len(r) for r in rows))
    tokens = np.zeros((len(rows), 1, width), dtype=np.int32)
    for i, r in enumerate(rows):
        tokens[i, 0, : len(r)] = r
    t = grpcclient.InferInput("TOKENS_BATCH", list(tokens.shape), "INT32")
    t.set_data_from_numpy(tokens)
    n = grpcclient.InferInput("SEQUENCE_LENGTH", [len(rows), 1], "INT32")
    n.set_data_from_numpy(np.array([[len(r)] for r in rows], dtype=np.int32))
    out = client.infer(model, [t, n], request_id=request_id).as_numpy("OUTPUT")
    return [v.decode("utf-8") for v in out.reshape(-1)]


@pytest.mark.parametrize("kind", KINDS)
def test_streams_equal_the_one_shot_decode_and_the_python_model(served, tokenizer_dirs, kind):
    """One token per request, as a streaming ensemble sends them: each piece is whole characters, and the
    concatenation is the tokenizer's decode, for the native model and the python one alike."""
    import tritonclient.grpc as grpcclient

    tok = Tokenizer.from_dir(tokenizer_dirs[kind])
    c = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        for k, text in enumerate(TEXTS):
            ids = tok.encode(text, add_special_tokens=True)
            for impl in ("native", "python"):
                pieces = [_post(c, f"post_{kind}_{impl}", [[i]], f"{kind}-{k}-{impl}")[0] for i in ids]
                assert "".join(pieces) == tok.decode(ids), (impl, text)
                assert all("\ufffd" not in p for p in pieces), (impl, pieces)
            if kind == "hf" and k == 0:
                assert pieces.count("") > 0  # partial characters were held back
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_any_ids_decode_like_the_tokenizer(served, tokenizer_dirs, kind):
    """Random ids (broken UTF-8 included, every U+FFFD where the tokenizer puts one): one-shot batched requests
    equal the tokenizer's decode exactly; a stream equals it up to the incomplete character it holds back."""
    import tritonclient.grpc as grpcclient

    tok = Tokenizer.from_dir(tokenizer_dirs[kind])
    rng = random.Random(kind)
    # byte-ish tokens make broken UTF-8 likely: the tokens whose piece is not valid UTF-8 on its own
    pieces, _ = tok.byte_pieces()
    broken = [i for i, p in enumerate(pieces) if p and not _valid(p)][:2000] or range(tok.vocab_size)
    rows = [
        [rng.choice(broken if rng.random() < 0.5 else range(tok.vocab_size)) for _ in range(rng.randrange(0, 24))]
        for _ in range(8)
    ]
    c = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        assert _post(c, f"post_{kind}_native", rows) == [tok.decode(r) for r in rows]
        for k, row in enumerate(rows):
            streamed = "".join(_post(c, f"post_{kind}_native", [[i]], f"rand-{kind}-{k}")[0] for i in row)
            full = tok.decode(row)
            assert full.startswith(streamed) and full[len(streamed) :] in ("", "\ufffd"), (row, streamed, full)
    finally:
        c.close()


def _valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_bad_input_is_an_error_response(served, tokenizer_dirs):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="outside the vocabulary"):
            _post(c, "post_hf_native", [[10**9]])
        t = grpcclient.InferInput("TOKENS_BATCH", [1, 1, 2], "INT32")
        t.set_data_from_numpy(np.array([[[5, 6]]], dtype=np.int32))
        n = grpcclient.InferInput("SEQUENCE_LENGTH", [1, 1], "INT32")
        n.set_data_from_numpy(np.array([[3]], dtype=np.int32))
        with pytest.raises(InferenceServerException, match="SEQUENCE_LENGTH"):
            c.infer("post_hf_native", [t, n])
        assert _post(c, "post_hf_native", [Tokenizer.from_dir(tokenizer_dirs["hf"]).encode("ok")]) == ["ok"]
    finally:
        c.close()
