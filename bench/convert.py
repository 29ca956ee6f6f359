#!/usr/bin/env python
"""Benchmark: streamed FP8 conversion memory and throughput (not a test; results go to BENCHMARKS.md).

    python bench/convert.py nemo  [--workdir DIR]   # Mistral NeMo 12B shapes, ~24.5 GB bf16 -> FP8 tp 1
    python bench/convert.py 1b    [--workdir DIR]   # ~1.1B llama: nim_build vs the modelopt path, side by side

nemo: writes a synthetic checkpoint with NeMo's exact shapes (random weights, 5 shards, real Tekken tokenizer),
converts it with `nim_build engine --quant fp8` and, in the same run, times `dd` reading the same input bytes
and writing the same output bytes (fsync'd), so the throughput ratio is measured side by side.
1b: the same conversion vs tests/oracle/modelopt_export.py (HF model in memory, mtq.quantize, export), both
calibrated on the same batch: wall time and peak RSS ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
NEMO = dict(
    hidden_size=5120,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=131072,
    max_position_embeddings=1024000,
    rope_theta=1e6,
)
ONE_B = dict(
    hidden_size=2048,
    num_hidden_layers=14,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=8192,
    vocab_size=131072,
    max_position_embeddings=8192,
    rope_theta=5e5,
)  # Tekken vocab


def write_synthetic(out: Path, shape: dict, arch: str, shards: int) -> int:
    """A random bf16 checkpoint with the given shapes, sharded like HF does; returns total bytes."""
    out.mkdir(parents=True, exist_ok=True)
    H, I, V, hd = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    names = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update(
            {
                p + "self_attn.q_proj.weight": (q, H),
                p + "self_attn.k_proj.weight": (kv, H),
                p + "self_attn.v_proj.weight": (kv, H),
                p + "self_attn.o_proj.weight": (H, q),
                p + "mlp.gate_proj.weight": (I, H),
                p + "mlp.up_proj.weight": (I, H),
                p + "mlp.down_proj.weight": (H, I),
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
            }
        )
    order = list(names)
    per = -(-len(order) // shards)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for n in order[s * per : (s + 1) * per]:
            shp = names[n]
            t = (torch.ones(shp) if len(shp) == 1 else torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16)
            tensors[n] = t
            weight_map[n] = fname
            total += t.numel() * 2
        save_file(tensors, out / fname)
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg = {
        "architectures": [arch],
        "model_type": "mistral" if arch.startswith("Mistral") else "llama",
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **shape,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    import mistral_common

    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240718.json", out / "tekken.json")
    return total


def ensure_synthetic(out: Path, which: str) -> None:
    """Write the synthetic checkpoint in a child process: Linux carries a process's peak RSS across fork + exec,
    so a benchmark process that had held the tensors would inflate every measured child's peak."""
    if not (out / "config.json").is_file():
        print(f"writing synthetic {which} checkpoint ...", file=sys.stderr)
        subprocess.run([sys.executable, __file__, which, "--write-only", "--workdir", str(out.parent)], check=True)


def timed(cmd: list[str], **kw) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run cmd; return (seconds, peak RSS bytes of that child alone, result)."""
    t = time.monotonic()
    proc = subprocess.Popen(cmd, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with exit code {proc.returncode}")
    return time.monotonic() - t, usage.ru_maxrss * 1024, proc


def drop_caches():
    """Make reads come from disk where we may (root); otherwise the number includes page-cache hits."""
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def dd_baseline(inputs: list[Path], out_bytes: int, scratch: Path) -> tuple[float, float]:
    drop_caches()
    t = time.monotonic()
    for f in inputs:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M", "status=none"], check=True)
    read_s = time.monotonic() - t
    t = time.monotonic()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={scratch}",
            "bs=16M",
            f"count={-(-out_bytes // (16 << 20))}",
            "conv=fsync",
            "status=none",
        ],
        check=True,
    )
    write_s = time.monotonic() - t
    scratch.unlink()
    return read_s, write_s


def engine_cmd(
    model: Path, out: Path, samples: int, seq: int, quant: str = "fp8", backend: str = "reference"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nim_build",
        "engine",
        str(model),
        "--out",
        str(out),
        "--quant",
        quant,
        "--backend",
        backend,
        "--no-accuracy-gate",
        "--calib-samples",
        str(samples),
        "--calib-seq-len",
        str(seq),
        "--force",
        "--json",
    ]


def bench_nemo(work: Path, samples: int, seq: int) -> dict:
    model = work / "nemo-synthetic"
    ensure_synthetic(model, "nemo")
    inputs = sorted(model.glob("*.safetensors"))
    in_bytes = sum(f.stat().st_size for f in inputs)
    rows = {}
    for quant in ("fp8", "fp8-pc-pt"):
        out = work / f"nemo-{quant}"
        drop_caches()
        wall, rss, _ = timed(engine_cmd(model, out, samples, seq, quant), stdout=subprocess.PIPE)
        t = json.loads((out / "manifest.json").read_text())["timings_s"]
        out_bytes = sum(f.stat().st_size for f in (out / "checkpoint").glob("*.safetensors"))
        shutil.rmtree(out)
        rows[quant] = {
            "wall_s": round(wall, 1),
            "calibrate_s": round(t.get("calibrate", 0.0), 1),
            "convert_s": round(t["convert"], 1),
            "peak_rss_GiB": round(rss / 2**30, 2),
            "MBps_wall": round((in_bytes + out_bytes) / wall / 1e6),
            "MBps_convert": round((in_bytes + out_bytes) / t["convert"] / 1e6),
            "out_bytes": out_bytes,
        }
    read_s, write_s = dd_baseline(inputs, rows["fp8"]["out_bytes"], work / "dd.scratch")
    dd = (in_bytes + rows["fp8"]["out_bytes"]) / (read_s + write_s) / 1e6
    for r in rows.values():
        r["dd_MBps"] = round(dd)
        r["convert_vs_dd"] = round(r["MBps_convert"] / dd, 2)
        r["wall_vs_dd"] = round(r["MBps_wall"] / dd, 2)
    return {
        "input_bytes": in_bytes,
        "calib": f"{samples}x{seq}",
        "dd_read_s": round(read_s, 1),
        "dd_write_s": round(write_s, 1),
        **{f"{q}": r for q, r in rows.items()},
    }


def bench_1b(work: Path, samples: int, seq: int) -> dict:
    import numpy as np

    model = work / "llama-1b-synthetic"
    ensure_synthetic(model, "1b")
    ids = torch.randint(0, ONE_B["vocab_size"], (samples, seq), generator=torch.Generator().manual_seed(0))
    np.save(work / "calib.npy", ids.numpy())
    # nim_build reads its batch from the text; the modelopt path gets random ids of the same shape: the work
    # (one forward over samples x seq tokens) is the same.
    ours_s, ours_rss, _ = timed(engine_cmd(model, work / "ours", samples, seq), stdout=subprocess.DEVNULL)
    mo_s, mo_rss, _ = timed(
        [
            sys.executable,
            str(REPO / "tests/oracle/modelopt_export.py"),
            "--model",
            str(model),
            "--calib-ids",
            str(work / "calib.npy"),
            "--tp",
            "1",
            "--out",
            str(work / "modelopt"),
            "--threads",
            str(os.cpu_count()),
        ],
        stdout=subprocess.DEVNULL,
    )
    return {
        "nim_build_s": round(ours_s, 1),
        "modelopt_s": round(mo_s, 1),
        "time_ratio": round(mo_s / ours_s, 2),
        "nim_build_peak_rss_GiB": round(ours_rss / 2**30, 2),
        "modelopt_peak_rss_GiB": round(mo_rss / 2**30, 2),
        "rss_ratio": round(mo_rss / ours_rss, 2),
        "calib": f"{samples}x{seq}",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["nemo", "1b"])
    ap.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-seq-len", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for reruns")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.write_only:
        if args.which == "nemo":
            write_synthetic(args.workdir / "nemo-synthetic", NEMO, "MistralForCausalLM", shards=5)
        else:
            write_synthetic(args.workdir / "llama-1b-synthetic", ONE_B, "LlamaForCausalLM", shards=1)
        return
    fn = bench_nemo if args.which == "nemo" else bench_1b
    result = fn(args.workdir, args.calib_samples, args.calib_seq_len)
    print(json.dumps(result, indent=2))
    if not args.keep:  # only what this benchmark wrote
        for d in ["nemo-synthetic"] if args.which == "nemo" else ["llama-1b-synthetic", "ours", "modelopt"]:
            shutil.rmtree(args.workdir / d, ignore_errors=True)


if __name__ == "__main__":
    main()
