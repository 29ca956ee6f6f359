"""`nim_build engine` end to end on tiny models: outputs, YAML config, and one test per bad input.

User errors must exit 2 with one line on stderr and no traceback, and must never leave a complete-looking
output directory (one with manifest.json)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_slow_model, make_tiny_model

from nim_build.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_user_error(code, err, match):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and match in lines[-1], err
    assert "Traceback" not in err


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_model(tmp_path / "hf", hidden_size=80, num_heads=4, num_kv_heads=2, head_dim=16)


def test_bf16_reference_build_writes_manifest_last(tmp_path, tiny, capsys):
    out = tmp_path / "eng"
    code, stdout, err = run_cli(
        capsys,
        "engine",
        str(tiny),
        "--out",
        str(out),
        "--quant",
        "bf16",
        "--backend",
        "reference",
        "--tp",
        "2",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["backend"] == "reference" and summary["tp"] == 2
    m = json.loads((out / "manifest.json").read_text())
    assert m["build"]["tp"] == 2 and m["backend"] == "reference" and m["spec"]["head_size"] == 16
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["outputs"]) == files
    assert {"checkpoint/config.json", "checkpoint/rank0.safetensors", "checkpoint/rank1.safetensors"} <= files
    assert set(m["model"]["input_files"]) == {"config.json", "model.safetensors"}
    assert m["versions"]["tensorrt_llm_target"].startswith("1.2")
    assert m["peak_rss_bytes"] > 0 and m["timings_s"]["total"] > 0
    assert not list(tmp_path.glob(".eng.partial-*"))


def test_yaml_config_mirrors_flags_and_flags_win(tmp_path, tiny, capsys):
    cfg = tmp_path / "build.yaml"
    cfg.write_text(f"model: {tiny}\nquant: bf16\ntp: 2\nmax-seq-len: 512\nbackend: reference\n")
    out = tmp_path / "eng"
    code, _, err = run_cli(capsys, "engine", "--config", str(cfg), "--out", str(out), "--tp", "1")
    assert code == 0, err
    build = json.loads((out / "manifest.json").read_text())["build"]
    assert (build["quant"], build["tp"], build["max_seq_len"]) == ("bf16", 1, 512)


def test_yaml_unknown_key(tmp_path, tiny, capsys):
    cfg = tmp_path / "build.yaml"
    cfg.write_text("quantization: fp8\n")
    code, _, err = run_cli(capsys, "engine", str(tiny), "--config", str(cfg))
    assert_user_error(code, err, "unknown keys quantization")


def test_missing_config_json(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    code, _, err = run_cli(capsys, "engine", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "has no config.json")
    assert not (tmp_path / "o").exists()


def test_unknown_architecture(tmp_path, tiny, capsys):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (tiny / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "engine", str(tiny), "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "supported: LlamaForCausalLM, MistralForCausalLM")


def test_truncated_safetensors(tmp_path, tiny, capsys):
    f = tiny / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(capsys, "engine", str(tiny), "--out", str(tmp_path / "o"), "--quant", "bf16")
    assert_user_error(code, err, "is truncated")


def test_index_names_missing_shard(tmp_path, tiny, capsys):
    (tiny / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.embed_tokens.weight": "model.safetensors",
                    "lm_head.weight": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    code, _, err = run_cli(capsys, "engine", str(tiny), "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "names shard 'model-00002-of-00002.safetensors', which is missing")


def test_tp_not_dividing_heads(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "hf", hidden_size=72, num_heads=6, num_kv_heads=2, head_dim=12)
    code, _, err = run_cli(capsys, "engine", str(model), "--out", str(tmp_path / "o"), "--tp", "4")
    assert_user_error(code, err, "--tp 4 does not divide num_attention_heads=6")


def test_impossible_kv_replication(tmp_path, capsys):
    model = make_tiny_model(
        tmp_path / "hf", hidden_size=96, num_heads=12, num_kv_heads=3, head_dim=8, intermediate_size=96
    )
    code, _, err = run_cli(capsys, "engine", str(model), "--out", str(tmp_path / "o"), "--tp", "4")
    assert_user_error(code, err, "cannot replicate num_key_value_heads=3 over --tp 4")


def test_max_num_tokens_below_one_kv_block(tmp_path, tiny, capsys):
    code, _, err = run_cli(capsys, "engine", str(tiny), "--out", str(tmp_path / "o"), "--max-num-tokens", "16")
    assert_user_error(code, err, "max_num_tokens 16 is less than one KV-cache block (32 tokens)")
    assert not (tmp_path / "o").exists()


def test_pickle_weights_refused_unless_opted_in(tmp_path, tiny, capsys):
    from safetensors.torch import load_file

    state = load_file(str(tiny / "model.safetensors"))
    (tiny / "model.safetensors").unlink()
    torch.save(state, tiny / "pytorch_model.bin")
    code, _, err = run_cli(capsys, "engine", str(tiny), "--out", str(tmp_path / "o"), "--quant", "bf16")
    assert_user_error(code, err, "--allow-pickle")
    code, _, err = run_cli(
        capsys,
        "engine",
        str(tiny),
        "--out",
        str(tmp_path / "o"),
        "--quant",
        "bf16",
        "--backend",
        "reference",
        "--allow-pickle",
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "o"]  # converted in nim_build's cache, not beside it


def test_existing_output_needs_force(tmp_path, tiny, capsys):
    out = tmp_path / "eng"
    args = ["engine", str(tiny), "--out", str(out), "--quant", "bf16", "--backend", "reference"]
    assert run_cli(capsys, *args)[0] == 0
    before = (out / "manifest.json").read_text()
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, "already exists; pass --force")
    assert (out / "manifest.json").read_text() == before
    code, _, err = run_cli(capsys, *args, "--force")
    assert code == 0, err
    assert (out / "manifest.json").is_file()


def test_build_killed_midway_leaves_nothing_complete_and_rerun_works(tmp_path):
    model = make_slow_model(tmp_path / "hf")
    out = tmp_path / "eng"
    cmd = [
        sys.executable,
        "-m",
        "nim_build",
        "engine",
        str(model),
        "--out",
        str(out),
        "--quant",
        "fp8",
        "--backend",
        "reference",
        "--no-accuracy-gate",
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "32",
    ]
    # The built-in calibration text needs a tokenizer: give the random model a real one.
    _add_tokenizer(model)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".eng.partial-*/checkpoint/rank0.safetensors")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and not out.exists()
    partials = list(tmp_path.glob(".eng.partial-*"))
    assert partials and not any((p / "manifest.json").exists() for p in partials)
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").is_file()
    assert not list(tmp_path.glob(".eng.partial-*")), "the stale partial output of the killed build is removed"


def _add_tokenizer(model_dir: Path):
    """A real byte-level BPE tokenizer (trained on the spot) whose ids fit the tiny vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        ["hello world, the quick brown fox"] * 10,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(str(model_dir / "tokenizer.json"))


def test_tokenizer_that_does_not_match_the_model(tmp_path, tiny, capsys):
    _add_tokenizer(tiny)  # ids up to ~300, the tiny model has 256
    code, _, err = run_cli(capsys, "engine", str(tiny), "--out", str(tmp_path / "o"), "--backend", "reference")
    assert_user_error(code, err, "the tokenizer does not belong to this model")
    assert not (tmp_path / "o").exists()
