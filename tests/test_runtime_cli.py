"""`nim_build run ENGINE --prompt TEXT`: local generation from an engine directory, plain, streamed and JSON."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from nim_build.builder.manifest import write_manifest
from nim_build.cli.run import command


@pytest.fixture(scope="module")
def engine_dir(default_model_dir, smollm2_bf16_checkpoint, tmp_path_factory):
    """The default model's bf16 checkpoint in a complete engine directory (checkpoint/, tokenizer/, manifest)."""
    root = tmp_path_factory.mktemp("run_engine")
    shutil.copytree(smollm2_bf16_checkpoint, root / "checkpoint")
    (root / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (default_model_dir / name).is_file():
            shutil.copy(default_model_dir / name, root / "tokenizer" / name)
    write_manifest(
        root,
        {
            "name": "smollm2-bf16",
            "backend": "reference",
            "build": {"max_seq_len": 256, "max_batch_size": 4, "max_num_tokens": 512},
            "tokenizer": {
                "dir": "tokenizer",
                "kind": "hf",
                "bos_id": 1,
                "end_id": 2,
                "pad_id": 2,
                "chat_template": True,
            },
        },
    )
    return root


def run(*args):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_json_output_and_stream_print_the_same_text(engine_dir):
    data = json.loads(run(engine_dir, "--prompt", "The capital of France is", "--max-tokens", 8, "--json"))
    assert data["prompt_tokens"] == 5 and data["completion_tokens"] == len(data["token_ids"]) <= 8
    assert "Paris" in data["text"] and data["finish_reason"] in ("length", "end_id")
    assert data["ttft_s"] > 0 and data["tokens_per_s"] > 0
    streamed = run(engine_dir, "--prompt", "The capital of France is", "--max-tokens", 8, "--stream")
    assert streamed == data["text"] + "\n"


def test_chat_template_and_seeded_sampling(engine_dir):
    chat = json.loads(
        run(engine_dir, "--prompt", "What is the capital of France?", "--chat", "--max-tokens", 12, "--json")
    )
    assert chat["prompt_tokens"] > 10 and "Paris" in chat["text"]
    args = [
        engine_dir,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        6,
        "--temperature",
        1.0,
        "--top-k",
        50,
        "--top-p",
        0.95,
        "--seed",
        7,
        "--json",
    ]
    assert json.loads(run(*args))["token_ids"] == json.loads(run(*args))["token_ids"]
