"""--backend onnx: the checkpoint as an ONNX decoder, checked with onnx.checker and run by ONNX Runtime.

Independent references: transformers' own forward pass and generate() (the same HF weights), onnxruntime-genai's
generator loading the directory as its model, the reference runtime on the same FP8 checkpoint (the Q/DQ graph
must compute its function), and the checkpoint's bytes (one quantization, two writers). TensorRT cannot be
installed here: its adapter is tested against a fake module with the exact builder calls expected.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine_cli import assert_user_error, run_cli
from tiny_models import convert, llama3_scaling, make_calib_ids, make_tiny_model

from nim_build.builder import onnx_export, tensorrt_adapter
from nim_build.builder.onnx_verify import ExportCheckError, OrtDecoder, check_export
from nim_build.builder.safetensors_io import CheckpointReader

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
# NeMo's shape in small: head_dim != hidden / heads, GQA, rope base 1e6. Llama 3.1's: llama3 rope scaling, tied
# embeddings, one KV head.
NEMO_LIKE = dict(arch="MistralForCausalLM", hidden_size=80, num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=1e6)
LLAMA31_LIKE = dict(
    arch="LlamaForCausalLM",
    hidden_size=64,
    num_heads=4,
    num_kv_heads=1,
    rope_theta=5e5,
    rope_scaling=llama3_scaling(),
    tie_word_embeddings=True,
    spelling="tf457",
)


def _export(hf: Path, root: Path, quant: str, dtype: str = "float32", max_seq_len: int = 256) -> tuple[Path, dict]:
    """convert.py's checkpoint of hf, then its ONNX graph, as the pipeline does it."""
    ckpt, onnx_dir = root / "checkpoint", root / "onnx"
    ckpt.mkdir(parents=True)
    calib = torch.as_tensor(make_calib_ids(256)) if quant == "fp8" else None
    written = convert(hf, ckpt, quant=quant, calib_ids=calib, dtype=dtype, hashed=True)["sha256"]
    info = onnx_export.export_onnx(ckpt, onnx_dir, max_seq_len=max_seq_len, bos_id=1, end_ids=[2], pad_id=2)
    info["written"] = written["rank0.safetensors"]
    check_export(onnx_dir, info["written"])
    return onnx_dir, info


def _feeds(session, ids: np.ndarray, mask: np.ndarray, past: dict | None, position_ids: np.ndarray) -> dict:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            b, kv, d = ids.shape[0], i.shape[1], i.shape[3]
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = past[i.name] if past else np.zeros((b, kv, 0, d), dtype)
    return feeds


@pytest.mark.parametrize("shape", ["nemo", "llama31"])
def test_prefill_and_decode_with_the_cache_fed_back_match_transformers(tmp_path, shape):
    """Two sequences, the second left-padded; a prefill then three decode steps, each step's present.* fed back
    as past_key_values.*: the logits of every real position equal transformers' (float32)."""
    import onnxruntime as ort
    import transformers

    kw = NEMO_LIKE if shape == "nemo" else LLAMA31_LIKE
    hf = make_tiny_model(tmp_path / "hf", dtype=torch.float32, **kw)
    onnx_dir, _ = _export(hf, tmp_path / "out", "fp32")
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    feeds = _feeds(session, ids.numpy(), mask.numpy(), None, positions.numpy())
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feeds)))
    real = mask.bool()
    np.testing.assert_allclose(got["logits"][real.numpy()], out.logits[real].numpy(), atol=2e-4, rtol=1e-4)

    cache = out.past_key_values
    for step in range(3):
        nxt = torch.tensor(got["logits"][:, -1].argmax(-1))[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        pos = positions[:, -1:] + 1 + step
        with torch.no_grad():
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        past = {n.replace("present.", "past_key_values."): v for n, v in got.items() if n.startswith("present.")}
        got = dict(zip(names, session.run(None, _feeds(session, nxt.numpy(), mask.numpy(), past, pos.numpy()))))
        np.testing.assert_allclose(got["logits"][:, 0], out.logits[:, 0].numpy(), atol=2e-4, rtol=1e-4)
        assert got["present.0.key"].shape[2] == 8 + step


@pytest.mark.parametrize("quant", ["fp8", "fp8-pc-pt"])
def test_fp8_graph_computes_the_reference_runtimes_function_with_the_checkpoints_bytes(tmp_path, quant):
    """In float32 compute the Q/DQ graph must equal the reference runtime on the same FP8 checkpoint (which
    rounds activations as TensorRT-LLM does); every FP8 weight of the graph is the checkpoint's tensor, read
    through the graph's own external-data references, and the data file is the checkpoint file itself."""
    import onnx

    from nim_build.runtime.model import DecoderModel, SeqChunk

    hf = make_tiny_model(tmp_path / "hf", **NEMO_LIKE)
    onnx_dir, info = _export(hf, tmp_path / "out", quant)
    assert info["quant_algo"] == {"fp8": "FP8", "fp8-pc-pt": "FP8_PER_CHANNEL_PER_TOKEN"}[quant]
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    logits, _ = OrtDecoder(onnx_dir).forward(ids)
    ref = DecoderModel.from_checkpoint(tmp_path / "out" / "checkpoint", compute_dtype=torch.float32)
    with torch.inference_mode():
        expected = ref.forward(ids.reshape(-1), [SeqChunk(0, 24)], all_logits=True).logits
    torch.testing.assert_close(logits, expected, atol=2e-3, rtol=1e-3)

    assert os.readlink(tmp_path / "out/checkpoint/rank0.safetensors") == "../onnx/model.onnx.data"
    reader = CheckpointReader(tmp_path / "out" / "checkpoint")
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    data = (onnx_dir / "model.onnx.data").read_bytes()
    fp8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.external_data]
    assert len(fp8) == 2 * 5  # qkv, dense, fc, gate, proj per layer
    for t in fp8:
        where = {e.key: int(e.value) for e in t.external_data if e.key != "location"}
        ours = data[where["offset"] : where["offset"] + where["length"]]
        assert ours == reader.get(t.name).view(torch.uint8).numpy().tobytes(), t.name
    reader.close()


def test_half_precision_exports_and_which_onnx_runtime_runs_on_cpu(tmp_path):
    """float16 runs on ONNX Runtime's CPU kernels (close to transformers' float32); bfloat16 is written and passes
    onnx.checker, but ONNX Runtime has no bfloat16 CPU kernels, which OrtDecoder says instead of failing later."""
    import transformers

    hf = make_tiny_model(tmp_path / "hf", **NEMO_LIKE)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits[0]
    fp16_dir, info = _export(hf, tmp_path / "fp16", "fp16", dtype="float16")
    assert info["dtype"] == "float16"
    logits, _ = OrtDecoder(fp16_dir).forward(ids)
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    assert (logits - expected).abs().max() < 0.05
    bf16_dir, info = _export(hf, tmp_path / "bf16", "bf16", dtype="bfloat16")
    assert info["dtype"] == "bfloat16"
    with pytest.raises(ExportCheckError, match="do not run bfloat16"):
        OrtDecoder(bf16_dir)


def test_a_corrupted_or_truncated_data_file_fails_the_builds_own_check(tmp_path):
    hf = make_tiny_model(tmp_path / "hf", **NEMO_LIKE)
    onnx_dir, info = _export(hf, tmp_path / "out", "fp32")
    data = onnx_dir / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(raw)
    with pytest.raises(ExportCheckError, match="not the checkpoint as written"):
        check_export(onnx_dir, info["written"])
    data.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ExportCheckError, match="outside model.onnx.data|fails onnx.checker"):
        check_export(onnx_dir, info["written"])


# -- the embedded model, through `nim_build engine` ------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_build(default_model_dir, tmp_path_factory):
    """`--backend onnx --quant fp32 --tensorrt` of the embedded model, the TensorRT step on the fake module."""
    from nim_build.builder.pipeline import build
    from nim_build.options import BuildOptions

    out = tmp_path_factory.mktemp("onnx") / "smollm2-fp32"
    with pytest.MonkeyPatch.context() as mp:
        calls = _install_fake_tensorrt(mp)
        mp.setattr(tensorrt_adapter, "unavailable_reason", lambda: None)
        opts = BuildOptions(
            model=str(default_model_dir), out=str(out), backend="onnx", quant="fp32", max_seq_len=256, tensorrt=True
        )
        build(opts, progress=False)
    return out, calls


def test_onnxruntime_genai_generates_what_transformers_generates(fp32_build, default_model_dir):
    """The export's onnx/ directory is an onnxruntime-genai model: its greedy tokens equal transformers'
    generate() on the same prompts, token for token."""
    import onnxruntime_genai as og
    import transformers

    out, _ = fp32_build
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    genai = og.Model(str(out / "onnx"))
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=len(ids) + 12, do_sample=False)
        gen = og.Generator(genai, params)
        gen.append_tokens(ids)
        got = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        assert got == expected.tolist(), prompt


def test_the_manifest_records_the_export_and_its_checks(fp32_build):
    out, _ = fp32_build
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "onnx" and m["build"]["options"]["backend"] == "onnx"
    o = m["onnx"]
    assert (o["opset"], o["ir_version"], o["dtype"], o["quant_algo"]) == (21, 10, "float32", None)
    assert (out / "checkpoint" / "rank0.safetensors").resolve() == (out / "onnx" / "model.onnx.data").resolve()
    assert m["outputs"]["onnx/model.onnx.data"] == m["outputs"]["checkpoint/rank0.safetensors"]
    from nim_build.builder.manifest import sha256_file

    assert m["outputs"]["onnx/model.onnx.data"] == sha256_file(out / "onnx" / "model.onnx.data")
    assert {"onnx/model.onnx", "onnx/genai_config.json", "onnx/tokenizer.json", "onnx/model.plan"} <= set(m["outputs"])
    assert m["versions"]["onnx"] and m["versions"]["onnxruntime"]
    assert o["trtexec"].startswith("trtexec --onnx=onnx/model.onnx --stronglyTyped --saveEngine=onnx/model.plan")
    assert o["tensorrt"]["plan_file"] == "model.plan" and o["tensorrt"]["strongly_typed"] is True
    assert not list((out / "onnx").glob(".gate-*"))  # the accuracy gate's copy of the graph is gone


def test_the_tensorrt_step_makes_exactly_these_builder_calls(fp32_build):
    out, calls = fp32_build
    layers = json.loads((out / "onnx" / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"]
    shapes = [c[1] for c in calls if c[0] == "set_shape"]
    assert [c[0] for c in calls] == [
        "Logger",
        "Builder",
        "create_network",
        "OnnxParser",
        "parse_from_file",
        "create_builder_config",
        "create_optimization_profile",
        *["set_shape"] * (3 + 2 * layers),
        "add_optimization_profile",
        "build_serialized_network",
    ]
    assert calls[2][1] == [1 << FakeTensorRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED]
    assert calls[4][1] == [str(Path(calls[4][1][0]).parent / "model.onnx")]
    assert shapes[0] == ["input_ids", (1, 1), (64, 1), (64, 256)]
    assert ["past_key_values.0.key", (1, 3, 0, 64), (64, 3, 128, 64), (64, 3, 255, 64)] in shapes
    assert (out / "onnx" / "model.plan").read_bytes() == b"fake plan"


def test_fp8_build_passes_the_gate_through_onnx_runtime(default_model_dir, tmp_path, capsys):
    code, stdout, err = run_cli(
        capsys,
        "engine",
        str(default_model_dir),
        "--backend",
        "onnx",
        "--out",
        str(tmp_path / "e"),
        "--max-seq-len",
        "256",
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "128",
        "--json",
    )
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    acc = m["accuracy"]
    assert acc["gate"]["passed"] and acc["tokens"] == 8 * 128
    assert acc["top1_agreement"] >= acc["gate"]["min_top1"] and acc["ppl_increase"] <= acc["gate"]["max_ppl_increase"]
    assert (m["onnx"]["dtype"], m["onnx"]["quant_algo"]) == ("float16", "FP8")
    assert len(acc["layer_rel_error"]) == m["spec"]["num_hidden_layers"] + 1
    code, _, err = run_cli(capsys, "repo", str(tmp_path / "e"), "--out", str(tmp_path / "repo"))
    assert_user_error(code, err, "onnx build, which Triton does not serve yet")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--tp", "2"], "--tp 2 needs --backend trtllm"),
        (["--kv-cache", "fp8"], "pass --kv-cache auto"),
        (["--tensorrt"], "trtexec --onnx="),
        (["--backend", "reference", "--tensorrt"], "pass --backend onnx with it"),
        (["--quant", "bf16"], "which needs the model's tokenizer"),
    ],
)
def test_what_the_onnx_writer_cannot_do_is_refused_before_any_work(tmp_path, capsys, args, match):
    hf = make_tiny_model(tmp_path / "hf", num_heads=4, num_kv_heads=2)
    code, _, err = run_cli(capsys, "engine", str(hf), "--backend", "onnx", "--out", str(tmp_path / "e"), *args)
    assert_user_error(code, err, match)
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.partial-*"))


def test_an_architecture_it_does_not_support_is_refused_naming_the_supported_ones(tmp_path, capsys):
    hf = make_tiny_model(tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "engine", str(hf), "--backend", "onnx", "--out", str(tmp_path / "e"))
    assert_user_error(code, err, "LlamaForCausalLM, MistralForCausalLM")
    assert not (tmp_path / "e").exists()


# -- the fake TensorRT ------------------------------------------------------------------------------------------


class FakeTensorRT:
    """What tensorrt_adapter touches of `tensorrt`, each call appended to CALLS as (name, args)."""

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1


def _install_fake_tensorrt(mp) -> list:
    calls: list = []

    def rec(name, *args):
        calls.append((name, list(args)))

    class Logger:
        WARNING = 2

        def __init__(self, level):
            rec("Logger", level)

    class Network:
        pass

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            rec("set_shape", name, lo, opt, hi)

    class Config:
        def add_optimization_profile(self, profile):
            assert isinstance(profile, Profile)
            rec("add_optimization_profile")

    class Builder:
        def __init__(self, logger):
            rec("Builder")

        def create_network(self, flags):
            rec("create_network", flags)
            return Network()

        def create_builder_config(self):
            rec("create_builder_config")
            return Config()

        def create_optimization_profile(self):
            rec("create_optimization_profile")
            return Profile()

        def build_serialized_network(self, network, config):
            assert isinstance(network, Network) and isinstance(config, Config)
            rec("build_serialized_network")
            return b"fake plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            rec("OnnxParser")

        def parse_from_file(self, path):
            assert Path(path).is_file() and (Path(path).parent / "model.onnx.data").is_file()
            rec("parse_from_file", path)
            return True

    module = types.ModuleType("tensorrt")
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    module.__version__ = "10.14.0-fake"
    module.Logger, module.Builder, module.OnnxParser = Logger, Builder, OnnxParser
    module.NetworkDefinitionCreationFlag = FakeTensorRT.NetworkDefinitionCreationFlag
    mp.setitem(sys.modules, "tensorrt", module)
    return calls
