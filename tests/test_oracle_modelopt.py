"""The oracle test: our streamed FP8 checkpoint equals what nvidia-modelopt 0.47's export_tensorrt_llm_checkpoint
writes (run as TensorRT-LLM 1.2's quantize_and_export does, tests/oracle/modelopt_export.py) from the same weights
and the same calibration batch: tensor names, shapes and dtypes; weight scales and FP8 weight bytes exactly;
activation and KV-cache scales within 1%; and rotary_base right where modelopt gets it wrong (transformers-5
config spelling)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import convert, llama3_scaling, make_calib_ids, make_tiny_model

ORACLE = Path(__file__).parent / "oracle" / "modelopt_export.py"
NEMO_LIKE = dict(hidden_size=80, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96)
CONFIG_KEYS = (
    "architecture",
    "dtype",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "head_size",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "position_embedding_type",
    "hidden_act",
    "norm_epsilon",
    "rotary_base",
    "mapping",
    "quantization",
    "use_parallel_embedding",
    "embedding_sharding_dim",
    "share_embedding_table",
    "bias",
)

CASES = {
    # name: (make_tiny_model kwargs, tp, fp8 kv cache)
    "nemo-shape-tp1-kv": (dict(NEMO_LIKE, kv_weight_scale=2e4), 1, True),
    "nemo-shape-tp2-kv": (dict(NEMO_LIKE, kv_weight_scale=2e4), 2, True),
    "gqa-1kv-below-tp-odd-vocab": (dict(num_kv_heads=1, vocab_size=255, spelling="tf457"), 2, True),
    "tied-embeddings": (dict(tie_word_embeddings=True, spelling="tf457"), 2, False),
    "llama3-scaling-type-key": (dict(arch="LlamaForCausalLM", rope_scaling=llama3_scaling("type")), 1, True),
}


def run_oracle(model_dir: Path, ids: np.ndarray, tp: int, kv: bool, out: Path) -> Path:
    np.save(out.parent / f"{out.name}-ids.npy", ids)
    cmd = [
        sys.executable,
        str(ORACLE),
        "--model",
        str(model_dir),
        "--calib-ids",
        str(out.parent / f"{out.name}-ids.npy"),
        "--tp",
        str(tp),
        "--out",
        str(out),
    ] + (["--kv-cache-fp8"] if kv else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def ours(model_dir: Path, ids: np.ndarray, tp: int, kv: bool, out: Path) -> Path:
    out.mkdir()
    convert(model_dir, out, quant="fp8", kv_cache="fp8" if kv else "auto", tp=tp, calib_ids=torch.from_numpy(ids))
    return out


def assert_same_checkpoint(got_dir: Path, want_dir: Path, tp: int):
    for r in range(tp):
        got = load_file(str(got_dir / f"rank{r}.safetensors"))
        want = load_file(str(want_dir / f"rank{r}.safetensors"))
        assert sorted(got) == sorted(want), f"rank {r}: names differ: {set(got) ^ set(want)}"
        for name, w in want.items():
            g = got[name]
            assert (g.dtype, g.shape) == (w.dtype, w.shape), name
            if name.endswith(("activation_scaling_factor", "cache_scaling_factor")):
                assert torch.allclose(g, w, rtol=0.01, atol=0), f"{name}: {g.item()} vs {w.item()}"
            else:  # weights (FP8 bytes included), weight scales, norms, embeddings: bit for bit
                assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), name


def assert_same_config(got_dir: Path, want_dir: Path):
    got = json.loads((got_dir / "config.json").read_text())
    want = json.loads((want_dir / "config.json").read_text())
    for key in CONFIG_KEYS:
        assert got[key] == want[key], f"config {key}: {got[key]!r} vs modelopt {want[key]!r}"
    if want.get("rotary_scaling"):
        w, g = want["rotary_scaling"], got["rotary_scaling"]
        assert g["type"] == w.get("type", w.get("rope_type"))
        assert {k: v for k, v in g.items() if k != "type"} == {
            k: v for k, v in w.items() if k not in ("type", "rope_type")
        }


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_equals_modelopt(tmp_path, case):
    kwargs, tp, kv = CASES[case]
    model = make_tiny_model(tmp_path / "hf", **kwargs)
    ids = make_calib_ids(kwargs.get("vocab_size", 256), n=4, seq=32)
    want = run_oracle(model, ids, tp, kv, tmp_path / "modelopt")
    got = ours(model, ids, tp, kv, tmp_path / "ours")
    assert_same_checkpoint(got, want, tp)
    assert_same_config(got, want)


def test_rotary_base_right_where_modelopt_gets_it_wrong(tmp_path):
    """transformers-5 spelling (rope_parameters): modelopt (transformers 4.57) writes rotary_base 10000 and
    calibrates with it. Ours must write 1e6 and equal modelopt run on the same weights in the 4.57 spelling."""
    tf5 = make_tiny_model(tmp_path / "tf5", spelling="tf5", **NEMO_LIKE, kv_weight_scale=2e4)
    tf457 = make_tiny_model(tmp_path / "tf457", spelling="tf457", **NEMO_LIKE, kv_weight_scale=2e4)
    ids = make_calib_ids(256, n=4, seq=32)
    wrong = run_oracle(tf5, ids, 1, True, tmp_path / "modelopt-tf5")
    assert json.loads((wrong / "config.json").read_text())["rotary_base"] == 10000.0  # modelopt's silent error
    right = run_oracle(tf457, ids, 1, True, tmp_path / "modelopt-tf457")
    got = ours(tf5, ids, 1, True, tmp_path / "ours")
    assert json.loads((got / "config.json").read_text())["rotary_base"] == 1e6
    assert_same_checkpoint(got, right, 1)
    assert_same_config(got, right)
