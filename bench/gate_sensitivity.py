"""How far the accuracy gate's metrics move for FP8 rounding alone vs for real conversion errors, on the embedded
default model: evaluates an FP8 build of SmolLM2-135M as built, then with one deliberate error at a time (a weight
scale off by 2x, gate/up swapped, K/V swapped, ...), each against transformers' own forward pass. The last row is
the independent baseline: nvidia-modelopt's own fake-quantized model (FP8_DEFAULT_CFG, calibrated on the same
32x256 batch `nim_build engine` uses) on the same evaluation tokens.

    python bench/gate_sensitivity.py [--engine DIR]   # DIR: an FP8 reference engine of `default` (else built)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nim_build.builder.accuracy import _accumulate, evaluate  # noqa: E402
from nim_build.builder.calib_data import token_batch  # noqa: E402
from nim_build.builder.default_model import materialize_default_model  # noqa: E402
from nim_build.builder.source import open_source  # noqa: E402

LAYER = "transformer.layers.{}."


def scaled(name: str, factor: float):
    def mutate(t):
        t[name] = t[name] * factor

    return mutate


def swap_gate_up(layer: int):
    def mutate(t):
        p = LAYER.format(layer) + "mlp."
        t[p + "fc.weight"], t[p + "gate.weight"] = t[p + "gate.weight"].clone(), t[p + "fc.weight"].clone()

    return mutate


def swap_k_v(layer: int, q_rows: int = 576, kv_rows: int = 192):
    def mutate(t):
        name = LAYER.format(layer) + "attention.qkv.weight"
        w = t[name]
        t[name] = torch.cat([w[:q_rows], w[q_rows + kv_rows :], w[q_rows : q_rows + kv_rows]])

    return mutate


CASES = [
    ("as built", None),
    ("layer 10 mlp.fc weight scale x1.25", scaled(LAYER.format(10) + "mlp.fc.weights_scaling_factor", 1.25)),
    ("layer 10 mlp.fc weight scale x2", scaled(LAYER.format(10) + "mlp.fc.weights_scaling_factor", 2.0)),
    ("layer 3 attention.qkv weight scale x1.5", scaled(LAYER.format(3) + "attention.qkv.weights_scaling_factor", 1.5)),
    ("layer 20 mlp.proj activation scale x0.25", scaled(LAYER.format(20) + "mlp.proj.activation_scaling_factor", 0.25)),
    ("layer 12 post_layernorm x1.1", scaled(LAYER.format(12) + "post_layernorm.weight", 1.1)),
    ("layer 5 gate/up swapped", swap_gate_up(5)),
    ("layer 5 K/V swapped", swap_k_v(5)),
]


def modelopt_fake_quant(hf: Path, ids: torch.Tensor, eos: int) -> dict:
    """Top-1 agreement, KL and perplexity increase of modelopt's fake-quantized FP8 model vs the float32 model,
    computed exactly as the gate computes them."""
    import copy

    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    calib = token_batch(open_source(hf).tokenizer, 32, 256, separator_id=eos)
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    fq = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        mtq.quantize(fq, copy.deepcopy(mtq.FP8_DEFAULT_CFG), forward_loop=lambda m: m(input_ids=calib))
        a, b = ref(ids).logits, fq(ids).logits
    acc = {"tokens": 0, "agree": 0, "kl": 0.0, "max_err": 0.0, "nll_hf": 0.0, "nll_q": 0.0, "targets": 0}
    _accumulate(acc, a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), ids)
    return {
        "top1_agreement": acc["agree"] / acc["tokens"],
        "mean_kl": acc["kl"] / acc["tokens"],
        "ppl_increase": math.exp((acc["nll_q"] - acc["nll_hf"]) / acc["targets"]) - 1,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", help="FP8 reference engine of the default model [default: build one]")
    args = ap.parse_args(argv)
    hf = materialize_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Path(args.engine) if args.engine else Path(tmp) / "engine"
        if not args.engine:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "nim_build",
                    "engine",
                    "default",
                    "--quant",
                    "fp8",
                    "--backend",
                    "reference",
                    "--no-accuracy-gate",
                    "--max-seq-len",
                    "512",
                    "--out",
                    str(engine),
                ],
                check=True,
            )
        eos = json.loads((hf / "config.json").read_text())["eos_token_id"]
        source = open_source(hf)
        ids = token_batch(source.tokenizer, 8, 128, separator_id=eos)  # the gate's own evaluation batch
        print("| checkpoint | top-1 agreement | mean KL | perplexity increase |\n|---|---|---|---|")
        for name, mutate in CASES:
            ckpt = Path(tmp) / "checkpoint"
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.copytree(engine / "checkpoint", ckpt)
            if mutate:
                tensors = load_file(ckpt / "rank0.safetensors")
                mutate(tensors)
                save_file(tensors, ckpt / "rank0.safetensors")
            r = evaluate(source, ckpt, ids)
            print(f"| {name} | {r['top1_agreement']:.3f} | {r['mean_kl']:.3f} | {r['ppl_increase']:+.1%} |", flush=True)
        r = modelopt_fake_quant(hf, ids, eos)
        print(
            f"| modelopt fake-quant (FP8_DEFAULT_CFG), not a checkpoint | {r['top1_agreement']:.3f} | "
            f"{r['mean_kl']:.3f} | {r['ppl_increase']:+.1%} |"
        )


if __name__ == "__main__":
    main()
