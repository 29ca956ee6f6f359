"""The TensorRT-LLM adapter and the backend choice, against a fake `tensorrt_llm` (tests/fake_tensorrt_llm)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from nim_build import TRTLLM_IMAGE
from nim_build.builder import backends, trtllm_adapter
from nim_build.cli._errors import exit_code
from nim_build.errors import BackendUnavailableError, ConfigError, NimBuildError

FAKE = Path(__file__).parent / "fake_tensorrt_llm"
H100 = ("NVIDIA H100 80GB HBM3", (9, 0))
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0))

FP8_PLUGINS = {
    "gpt_attention_plugin": "auto",
    "gemm_plugin": None,
    "context_fmha": True,
    "remove_input_padding": True,
    "use_paged_context_fmha": True,
    "use_fp8_context_fmha": True,
    "multiple_profiles": True,
    "tokens_per_block": 32,
}
LIMITS = {"max_batch_size": 16, "max_seq_len": 4096, "max_input_len": 4096, "max_num_tokens": 8192}


def _drop_tensorrt_llm_modules():
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture
def fake_trtllm(monkeypatch, tmp_path):
    """The fake package importable (here and in spawned workers), a call log, and an H100 as GPU 0."""
    _drop_tensorrt_llm_modules()
    monkeypatch.syspath_prepend(str(FAKE))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRTLLM_LOG", str(log))
    monkeypatch.setattr(trtllm_adapter, "_cuda_device", lambda: H100)
    yield log
    _drop_tensorrt_llm_modules()


@pytest.fixture
def no_trtllm(monkeypatch):
    _drop_tensorrt_llm_modules()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p).resolve() != FAKE.resolve()])
    assert trtllm_adapter.importlib.util.find_spec("tensorrt_llm") is None


def _checkpoint(root: Path, world_size: int, quant_algo: str | None, kv_cache_quant_algo: str | None = None) -> Path:
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    config = {
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "mapping": {"world_size": world_size, "tp_size": world_size, "pp_size": 1},
        "quantization": {
            "quant_algo": quant_algo,
            "kv_cache_quant_algo": kv_cache_quant_algo,
            "exclude_modules": ["lm_head"] if quant_algo else None,
        },
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    for r in range(world_size):
        (ckpt / f"rank{r}.safetensors").write_bytes(b"")
    return ckpt


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _expected_build_config(plugins: dict) -> dict:
    """BuildConfig.to_dict() of the fake: the real field names, our values, TensorRT-LLM defaults elsewhere."""
    return {
        "max_input_len": 4096,
        "max_seq_len": 4096,
        "opt_batch_size": 8,
        "max_batch_size": 16,
        "max_beam_width": 1,
        "max_num_tokens": 8192,
        "opt_num_tokens": None,
        "max_prompt_embedding_table_size": 0,
        "kv_cache_type": "PAGED",
        "gather_context_logits": False,
        "gather_generation_logits": False,
        "strongly_typed": True,
        "plugin_config": {
            "dtype": "float16",
            "bert_attention_plugin": "auto",
            "nccl_plugin": "auto",
            "low_latency_gemm_plugin": None,
            "paged_kv_cache": None,
            "reduce_fusion": False,
            "paged_state": True,
            "streamingllm": False,
            "use_fused_mlp": True,
            **plugins,
        },
    }


def test_fp8_build_passes_every_inflight_batching_flag(fake_trtllm, tmp_path):
    ckpt = _checkpoint(tmp_path, 2, "FP8", "FP8")
    out = trtllm_adapter.build_engine(ckpt, tmp_path / "engine", quant_algo="FP8", **LIMITS)

    assert out == {
        "tensorrt_llm_version": "1.2.1",
        "world_size": 2,
        "workers": 1,
        "ranks": [
            {"rank": 0, "gpu": 0, "seconds": out["ranks"][0]["seconds"]},
            {"rank": 1, "gpu": 0, "seconds": out["ranks"][1]["seconds"]},
        ],
        "build_config": {
            **LIMITS,
            "max_beam_width": 1,
            "kv_cache_type": "PAGED",
            "strongly_typed": True,
            "plugin_config": FP8_PLUGINS,
        },
    }
    json.dumps(out)  # goes into manifest.json as is
    calls = _calls(fake_trtllm)
    assert [(c["event"], c["rank"]) for c in calls] == [
        ("from_checkpoint", 0),
        ("build", 0),
        ("save", 0),
        ("from_checkpoint", 1),
        ("build", 1),
        ("save", 1),
    ]
    assert {c["ckpt_dir"] for c in calls if c["event"] == "from_checkpoint"} == {str(ckpt)}
    assert {c["pid"] for c in calls} == {os.getpid()}
    for r in range(2):
        built = json.loads((tmp_path / "engine" / f"rank{r}.engine").read_text())
        assert built["rank"] == r and built["checkpoint_dir"] == str(ckpt)
        assert built["build_config"] == _expected_build_config(FP8_PLUGINS)
    engine_config = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert engine_config["version"] == "1.2.1"
    assert engine_config["pretrained_config"]["quantization"]["quant_algo"] == "FP8"
    assert sorted(p.name for p in (tmp_path / "engine").iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]


def test_bf16_build_uses_the_gemm_plugin_and_no_fp8_attention(fake_trtllm, tmp_path):
    ckpt = _checkpoint(tmp_path, 1, None)
    out = trtllm_adapter.build_engine(ckpt, tmp_path / "engine", quant_algo=None, tokens_per_block=64, **LIMITS)
    plugins = {**FP8_PLUGINS, "gemm_plugin": "auto", "use_fp8_context_fmha": False, "tokens_per_block": 64}
    assert out["build_config"]["plugin_config"] == plugins
    built = json.loads((tmp_path / "engine" / "rank0.engine").read_text())
    assert built["build_config"] == _expected_build_config(plugins)


def test_fp8_weights_with_a_bf16_kv_cache_build_without_fp8_context_fmha(fake_trtllm, tmp_path):
    # TensorRT-LLM's build() would switch it off anyway (paged context FMHA needs an FP8 KV cache for it).
    ckpt = _checkpoint(tmp_path, 1, "FP8", None)
    out = trtllm_adapter.build_engine(ckpt, tmp_path / "engine", quant_algo="FP8", **LIMITS)
    assert out["build_config"]["plugin_config"] == {**FP8_PLUGINS, "use_fp8_context_fmha": False}


def test_per_channel_fp8_keeps_gemm_plugin_off_and_fp8_context_fmha_off(fake_trtllm, tmp_path):
    ckpt = _checkpoint(tmp_path, 1, "FP8_PER_CHANNEL_PER_TOKEN", "FP8")
    out = trtllm_adapter.build_engine(ckpt, tmp_path / "engine", quant_algo="FP8_PER_CHANNEL_PER_TOKEN", **LIMITS)
    assert out["build_config"]["plugin_config"] == {**FP8_PLUGINS, "use_fp8_context_fmha": False}


def test_workers_build_ranks_in_parallel_processes(fake_trtllm, tmp_path):
    ckpt = _checkpoint(tmp_path, 2, "FP8", "FP8")
    out = trtllm_adapter.build_engine(ckpt, tmp_path / "engine", quant_algo="FP8", workers=4, **LIMITS)
    assert out["workers"] == 2  # never more workers than ranks
    assert [(r["rank"], r["gpu"]) for r in out["ranks"]] == [(0, 0), (1, 1)]
    calls = _calls(fake_trtllm)
    build_pids = {c["rank"]: c["pid"] for c in calls if c["event"] == "build"}
    assert set(build_pids) == {0, 1} and os.getpid() not in build_pids.values()
    for r in range(2):
        built = json.loads((tmp_path / "engine" / f"rank{r}.engine").read_text())
        assert built["build_config"] == _expected_build_config(FP8_PLUGINS)


def test_a_rank_that_writes_no_engine_fails_the_build(fake_trtllm, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_SKIP_SAVE_RANK", "1")
    ckpt = _checkpoint(tmp_path, 2, "FP8")
    with pytest.raises(NimBuildError, match="without writing rank1.engine"):
        trtllm_adapter.build_engine(ckpt, tmp_path / "engine", quant_algo="FP8", **LIMITS)


def test_checkpoint_and_request_must_agree_and_limits_must_make_sense(fake_trtllm, tmp_path):
    ckpt = _checkpoint(tmp_path, 1, "FP8")
    with pytest.raises(ConfigError, match="quantized as FP8"):
        trtllm_adapter.build_engine(ckpt, tmp_path / "engine", quant_algo=None, **LIMITS)
    with pytest.raises(ConfigError, match="max_input_len"):
        trtllm_adapter.build_engine(ckpt, tmp_path / "engine", quant_algo="FP8", **{**LIMITS, "max_input_len": 5000})
    assert not fake_trtllm.exists()


def test_probe_without_tensorrt_llm(no_trtllm, monkeypatch):
    monkeypatch.setattr(trtllm_adapter, "_cuda_device", lambda: H100)
    p = trtllm_adapter.probe()
    assert p == trtllm_adapter.BackendProbe(False, None, H100[0], (9, 0), "TensorRT-LLM is not installed")


def test_probe_without_gpu(fake_trtllm, monkeypatch):
    monkeypatch.setattr(trtllm_adapter, "_cuda_device", lambda: None)
    p = trtllm_adapter.probe()
    assert (p.available, p.version, p.reason, p.fp8_capable) == (False, "1.2.1", "no CUDA GPU is visible", False)


def test_probe_on_h100_and_a100(fake_trtllm, monkeypatch):
    p = trtllm_adapter.probe()
    assert p == trtllm_adapter.BackendProbe(True, "1.2.1", H100[0], (9, 0), "") and p.fp8_capable
    monkeypatch.setattr(trtllm_adapter, "_cuda_device", lambda: A100)
    p = trtllm_adapter.probe()
    assert p.available and not p.fp8_capable


def test_probe_refuses_another_tensorrt_llm_line(fake_trtllm, monkeypatch):
    import tensorrt_llm

    monkeypatch.setattr(tensorrt_llm, "__version__", "1.3.0rc1")
    p = trtllm_adapter.probe()
    assert not p.available and p.reason == "TensorRT-LLM 1.3.0rc1 is installed, but nim_build builds engines with 1.2.x"


def test_the_real_cuda_probe_runs_on_this_machine():
    device = trtllm_adapter._cuda_device()
    assert device is None or (isinstance(device[0], str) and len(device[1]) == 2)


# --- backend choice -----------------------------------------------------------------------------------------


def _probe(available=True, device=H100, reason=""):
    return lambda: trtllm_adapter.BackendProbe(
        available, "1.2.1" if available else None, device and device[0], device and device[1], reason
    )


ARGV = ["engine", "default", "--out", "engines/smol", "--backend", "auto", "--quant", "fp8"]
IN_IMAGE = (
    f'docker run --rm --gpus all -v "$PWD":/work -w /work {TRTLLM_IMAGE} '
    "nim_build engine default --out engines/smol --quant fp8 --backend trtllm"
)


def test_reference_is_taken_as_asked():
    assert backends.choose_backend("reference", "fp8", probe=_probe(False)) == (
        "reference",
        "requested with --backend reference",
    )


def test_trtllm_without_tensorrt_llm_names_the_image_and_the_command():
    with pytest.raises(BackendUnavailableError) as e:
        backends.choose_backend("trtllm", "fp8", argv=ARGV, probe=_probe(False, None, "TensorRT-LLM is not installed"))
    assert str(e.value) == (
        f"--backend trtllm cannot build here: TensorRT-LLM is not installed. Build the engine in {TRTLLM_IMAGE} "
        f"on a GPU of compute capability >= 8.9: {IN_IMAGE}"
    )
    assert "\n" not in str(e.value) and exit_code(e.value) == 2


def test_trtllm_fp8_on_compute_capability_8_0_is_refused():
    with pytest.raises(
        BackendUnavailableError,
        match=r"fp8 needs a GPU of compute capability >= 8\.9 .*"
        r"NVIDIA A100-SXM4-80GB has 8\.0\. Build the engine in ",
    ):
        backends.choose_backend("trtllm", "fp8", argv=ARGV, probe=_probe(True, A100))
    with pytest.raises(BackendUnavailableError, match="fp8-pc-pt needs"):
        backends.choose_backend("trtllm", "fp8-pc-pt", argv=ARGV, probe=_probe(True, A100))


def test_trtllm_bf16_runs_on_compute_capability_8_0():
    assert backends.choose_backend("trtllm", "bf16", probe=_probe(True, A100)) == (
        "trtllm",
        "requested with --backend trtllm: TensorRT-LLM 1.2.1 on NVIDIA A100-SXM4-80GB (compute capability 8.0)",
    )


def test_auto_chooses_trtllm_when_it_can_and_says_why():
    assert backends.choose_backend("auto", "fp8", probe=_probe(True, H100)) == (
        "trtllm",
        "auto: TensorRT-LLM 1.2.1 on NVIDIA H100 80GB HBM3 (compute capability 9.0) can build the engine",
    )


def test_auto_falls_back_to_reference_and_says_why():
    name, reason = backends.choose_backend(
        "auto", "fp8", argv=ARGV, probe=_probe(False, None, "TensorRT-LLM is not installed")
    )
    assert name == "reference"
    assert reason == (
        "auto: TensorRT-LLM is not installed, so nim_build's PyTorch runtime serves the checkpoint; "
        f"for a TensorRT engine run this on a GPU of compute capability >= 8.9: {IN_IMAGE}"
    )
    name, reason = backends.choose_backend("auto", "fp8", argv=ARGV, probe=_probe(True, A100))
    assert name == "reference" and reason.startswith("auto: fp8 needs a GPU of compute capability >= 8.9")


def test_auto_uses_the_real_probe_by_default(no_trtllm):
    assert backends.choose_backend("auto", "fp8", argv=ARGV)[0] == "reference"


@pytest.mark.parametrize(
    "argv, tail",
    [
        (None, "nim_build engine MODEL --out DIR --backend trtllm"),
        (["engine", "m", "--backend=auto", "--tp", "2"], "nim_build engine m --tp 2 --backend trtllm"),
        (["engine", "org/My Model", "--out", "o"], "nim_build engine 'org/My Model' --out o --backend trtllm"),
    ],
)
def test_trtllm_command_reproduces_the_users_command(argv, tail):
    assert backends.trtllm_command(argv).endswith(f"{TRTLLM_IMAGE} {tail}")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError):
        backends.choose_backend("vllm", "fp8")


def test_cli_backend_trtllm_without_tensorrt_llm_exits_2(no_trtllm, tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nim_build.cli import main

    tiny = tmp_path / "tiny"
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(tiny)
    argv = ["engine", str(tiny), "--out", str(tmp_path / "out"), "--backend", "trtllm"]
    monkeypatch.setattr(sys, "argv", ["nim_build", *argv])
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("Error: --backend trtllm cannot build here: ")
    assert err.endswith(f"{TRTLLM_IMAGE} nim_build engine {tiny} --out {tmp_path / 'out'} --backend trtllm")
    assert not (tmp_path / "out").exists()
