"""Native FP8 on a GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell): correctness and speed.

1. The runtime's native path (torch._scaled_mm with the checkpoint's scales) against its CPU path (FP8 weights
   dequantized, activations fake-quantized with the same scales): logits of a random model at Mistral-NeMo-like
   proportions (head_dim != hidden/heads, GQA), per-tensor FP8 and FP8_PER_CHANNEL_PER_TOKEN.
2. FP8 vs bf16 GEMM time at Mistral NeMo 12B's layer shapes (hidden 5120, q 4096, kv 1024, ffn 14336).

    python bench/gpu_fp8.py [--tokens 1,16,128,1024,4096] [--iters 50]
Exits 2 with a message on a machine without such a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

NEMO = {"qkv": (4096 + 2 * 1024, 5120), "dense": (5120, 4096), "fc+gate": (2 * 14336, 5120), "proj": (5120, 14336)}


def refuse(msg: str) -> None:
    print(f"gpu_fp8: {msg}", file=sys.stderr)
    sys.exit(2)


def require_fp8_gpu() -> torch.device:
    if not torch.cuda.is_available():
        refuse(
            "no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
            "run this on a machine with an FP8 GPU (compute capability >= 8.9, e.g. H100)"
        )
    dev = torch.device("cuda")
    cc = torch.cuda.get_device_capability(dev)
    if cc < (8, 9):
        refuse(
            f"{torch.cuda.get_device_name(dev)} has compute capability {cc[0]}.{cc[1]}; native FP8 "
            "GEMMs need >= 8.9 (Ada, Hopper, Blackwell)"
        )
    return dev


def check_logits(dev: torch.device) -> list[str]:
    from tiny_models import convert, make_calib_ids, make_tiny_model

    from nim_build.runtime import DecoderModel, SeqChunk

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_tiny_model(
            Path(tmp) / "hf",
            hidden_size=512,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            head_dim=128,
            intermediate_size=1536,
            vocab_size=1024,
        )
        ids = torch.as_tensor(make_calib_ids(1024, n=2, seq=64, seed=1))
        for quant in ("fp8", "fp8-pc-pt"):
            ckpt = Path(tmp) / quant
            ckpt.mkdir()
            convert(hf, ckpt, quant=quant, calib_ids=ids)
            chunks = [SeqChunk(0, ids.shape[1])] * ids.shape[0]
            cpu = DecoderModel.from_checkpoint(ckpt, device="cpu").forward(ids.reshape(-1), chunks, all_logits=True)
            gpu_model = DecoderModel.from_checkpoint(ckpt, device=dev)
            assert gpu_model.native_fp8
            gpu = gpu_model.forward(ids.reshape(-1), chunks, all_logits=True).logits.cpu()
            ref = cpu.logits
            rel = float((gpu - ref).abs().max() / ref.abs().max())
            top1 = float((gpu.argmax(-1) == ref.argmax(-1)).float().mean())
            ok = rel < 0.05 and top1 >= 0.95
            rows.append(f"| {quant} | {rel:.4f} | {top1:.4f} | {'ok' if ok else 'MISMATCH'} |")
    return rows


def time_gemms(dev: torch.device, tokens: list[int], iters: int) -> list[str]:
    rows = []
    for name, (n, k) in NEMO.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        w_scale = (w.abs().max().float() / 448).reshape(())
        w8 = (w.float() / w_scale).to(torch.float8_e4m3fn)
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            pad = (-m) % 16
            x8 = torch.nn.functional.pad(x, (0, 0, 0, pad)).to(torch.float8_e4m3fn)
            one = torch.ones((), device=dev)
            t_bf16 = _time(lambda x=x, w=w: x @ w.t(), iters)
            t_fp8 = _time(
                lambda x8=x8, w8=w8, one=one, s=w_scale: torch._scaled_mm(
                    x8, w8.t(), scale_a=one, scale_b=s, out_dtype=torch.bfloat16
                ),
                iters,
            )
            flops = 2 * m * n * k
            rows.append(
                f"| {name} [{n}x{k}] | {m} | {t_bf16 * 1e3:.3f} | {t_fp8 * 1e3:.3f} | "
                f"{flops / t_bf16 / 1e12:.0f} | {flops / t_fp8 / 1e12:.0f} | {t_bf16 / t_fp8:.2f}x |"
            )
    return rows


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,128,1024,4096")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    dev = require_fp8_gpu()
    print(
        f"`python bench/gpu_fp8.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}\n"
    )
    print("| checkpoint | native vs CPU: max rel logit error | top-1 agreement | |\n|---|---|---|---|")
    rows = check_logits(dev)
    print("\n".join(rows))
    print("\n| layer | tokens | bf16 (ms) | FP8 (ms) | bf16 TFLOPS | FP8 TFLOPS | FP8 speedup |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(time_gemms(dev, [int(t) for t in args.tokens.split(",")], args.iters)))
    if any("MISMATCH" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
