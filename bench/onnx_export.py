#!/usr/bin/env python
"""Benchmark: ONNX export memory and time (not a test; results go to BENCHMARKS.md).

    python bench/onnx_export.py 1b    [--workdir DIR]   # ~1.4B llama, fp32: nim_build vs onnxruntime-genai's builder
    python bench/onnx_export.py nemo  [--workdir DIR]   # Mistral NeMo 12B shapes -> FP8 ONNX (calibrated, no gate)

1b: the synthetic checkpoint of bench/convert.py exported at fp32 by `nim_build engine --backend onnx --quant fp32`
(the TensorRT-LLM checkpoint and the ONNX graph, both written), by `python -m onnxruntime_genai.models.builder
-p fp32 -e cpu` and by optimum-onnx's `optimum-cli export onnx` (in its own venv, .cache/bench/optimum-venv, made
on first use: it needs onnx 1.23 and numpy 2, which clash with nim_build's pins), side by side, each in a fresh
process, page cache dropped first: wall time and peak RSS.
nemo: `nim_build engine --backend onnx --quant fp8` on NeMo's exact shapes (24.5 GB bf16 in, two FP8 outputs of
~13.6 GB each): wall, peak RSS and the onnx stage's time from the manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import REPO, drop_caches, engine_cmd, ensure_synthetic, timed  # noqa: E402


def _row(wall: float, rss: int) -> dict:
    return {"wall_s": round(wall, 1), "peak_rss_GiB": round(rss / 2**30, 2)}


def bench_1b(work: Path) -> dict:
    import subprocess

    model = work / "llama-1b-synthetic"
    ensure_synthetic(model, "1b")
    # The builder saves an HF tokenizer at the end and fails on a Tekken-only directory: give it the embedded
    # model's (the ids do not matter to an export).
    from nim_build.builder.default_model import materialize_default_model

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(materialize_default_model() / name, model / name)
    drop_caches()
    wall, rss, _ = timed(engine_cmd(model, work / "onnx-ours", 4, 64, "fp32", "onnx"), stdout=subprocess.DEVNULL)
    ours = {**_row(wall, rss), **_stages(work / "onnx-ours")}
    drop_caches()
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(work / "ortgenai")]
    builder += ["-p", "fp32", "-e", "cpu", "-c", str(work / "ortgenai-cache")]
    wall, rss, _ = timed(builder, stdout=subprocess.DEVNULL)
    rows = {"nim_build": ours, "onnxruntime_genai_builder": _row(wall, rss)}
    drop_caches()
    optimum = [str(_optimum_venv(work) / "bin" / "optimum-cli"), "export", "onnx", "--model", str(model)]
    optimum += ["--task", "text-generation-with-past", "--device", "cpu", str(work / "optimum")]
    try:
        wall, rss, _ = timed(optimum, stdout=subprocess.DEVNULL)
        rows["optimum_onnx"] = _row(wall, rss)
    except SystemExit as e:  # reported, not fatal: the other two rows stand
        rows["optimum_onnx"] = {"failed": str(e)}
    for name, row in rows.items():
        if name != "nim_build" and "wall_s" in row:
            row["rss_vs_nim_build"] = round(row["peak_rss_GiB"] / ours["peak_rss_GiB"], 2)
            row["time_vs_nim_build"] = round(row["wall_s"] / ours["wall_s"], 2)
    return rows


def _optimum_venv(work: Path) -> Path:
    import subprocess

    venv = work / "optimum-venv"
    if not (venv / "bin" / "optimum-cli").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        torch_pin = (REPO / "scripts" / "torch-version").read_text().strip()
        subprocess.run([*pip, f"torch=={torch_pin}"], check=True)  # the CPU build, as scripts/setup.sh
        subprocess.run([*pip, "optimum-onnx==0.1.0", "onnxruntime==1.32.0"], check=True)
    return venv


def bench_nemo(work: Path) -> dict:
    import subprocess

    model = work / "nemo-synthetic"
    ensure_synthetic(model, "nemo")
    drop_caches()
    wall, rss, _ = timed(engine_cmd(model, work / "nemo-onnx", 4, 64, "fp8", "onnx"), stdout=subprocess.DEVNULL)
    return {**_row(wall, rss), **_stages(work / "nemo-onnx")}


def _stages(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    t = m["timings_s"]
    return {
        "convert_s": round(t["convert"], 1),
        "calibrate_s": round(t.get("calibrate", 0.0), 1),
        "onnx_s": round(t["onnx"], 1),
        "onnx_data_GB": round((out / "onnx" / "model.onnx.data").stat().st_size / 1e9, 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["1b", "nemo"])
    ap.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for reruns")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = (bench_1b if args.which == "1b" else bench_nemo)(args.workdir)
    print(json.dumps(result, indent=2))
    written = ["onnx-ours", "ortgenai", "ortgenai-cache", "optimum"] if args.which == "1b" else ["nemo-onnx"]
    if not args.keep:
        written.append("llama-1b-synthetic" if args.which == "1b" else "nemo-synthetic")
    for d in written:  # only what this benchmark wrote
        shutil.rmtree(args.workdir / d, ignore_errors=True)


if __name__ == "__main__":
    main()
