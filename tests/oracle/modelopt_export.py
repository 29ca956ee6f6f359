#!/usr/bin/env python
"""Independent oracle: FP8 TensorRT-LLM checkpoint written by nvidia-modelopt, as TensorRT-LLM 1.2 does it.

    python tests/oracle/modelopt_export.py --model HF_DIR --calib-ids IDS.npy --tp N [--kv-cache-fp8] --out OUT

Mirrors `tensorrt_llm/quantization/quantize_by_modelopt.py::quantize_and_export` (TensorRT-LLM 1.2) for
qformat="fp8", decoder "llama":
  1. load the HF model with AutoModelForCausalLM in its own dtype (torch_dtype/dtype of config.json), eval();
  2. quant_cfg = mtq.FP8_DEFAULT_CFG (+ mtq.FP8_KV_CFG["quant_cfg"] when --kv-cache-fp8);
     mtq.quantize(model, quant_cfg, forward_loop) where forward_loop runs model(input_ids=batch) once under
     torch.no_grad() on exactly the [n, seq] int64 batch of --calib-ids (no padding, no attention mask);
  3. export_tensorrt_llm_checkpoint(model, "llama", dtype, export_dir=OUT, inference_tensor_parallel=tp,
     inference_pipeline_parallel=1);
  4. the same config.json post-edits as quantize_and_export: model_type="llama", architecture=type(model).__name__,
     rotary_scaling=model.config.rope_scaling when the key is missing, and kv_cache_quant_algo=None without
     --kv-cache-fp8.

Differences from upstream, all forced by this environment (CPU, modelopt 0.47):
  - device "cpu" (upstream insists on CUDA; nothing below depends on it for FP8 per-tensor max calibration),
    loaded without device_map (needs `accelerate`);
  - modelopt 0.47 stores quant_cfg as a list of entries, so the KV entries are appended to a deep copy of
    FP8_DEFAULT_CFG instead of upstream's `quant_cfg["quant_cfg"].update(...)` on the dict form (same effect:
    later entries win, FP8_KV_CFG enables `*[kv]_bmm_quantizer` as FP8 E4M3 per-tensor);
  - no tokenizer / dataset: the calibration batch is given as token ids.
Last stdout line: one JSON object {"out": ..., "files": [...], "seconds": ...} (modelopt prints progress before it).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--calib-ids", required=True, type=Path, help=".npy int64 [n, seq]")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--kv-cache-fp8", action="store_true")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared 2-core machines)")
    args = ap.parse_args(argv)

    t0 = time.time()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = np.load(args.calib_ids)
    if ids.ndim != 2:
        raise SystemExit(f"--calib-ids must be [n, seq], got shape {ids.shape}")
    batch = torch.from_numpy(ids.astype(np.int64))

    # Upstream: dtype = infer_dtype("auto", hf_config.torch_dtype) and from_pretrained(torch_dtype=...).
    hf_config = AutoConfig.from_pretrained(args.model)
    dtype = getattr(hf_config, "dtype", None) or torch.float16  # 4.57 reads torch_dtype into .dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # Upstream passes device_map="cpu" for device "cpu"; that needs `accelerate` (not installed here) and
    # places the same weights on the same device as the plain call.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    if int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size:
        raise SystemExit(f"--calib-ids hold ids outside [0, {model.config.vocab_size})")

    quant_cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if args.kv_cache_fp8:
        quant_cfg["quant_cfg"] = list(quant_cfg["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])

    def forward_loop(m=None):
        with torch.no_grad():
            (m or model)(input_ids=batch)

    model = mtq.quantize(model, quant_cfg, forward_loop=forward_loop)

    args.out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        architecture = type(model).__name__
        export_tensorrt_llm_checkpoint(
            model,
            "llama",
            dtype,
            export_dir=args.out,
            inference_tensor_parallel=args.tp,
            inference_pipeline_parallel=1,
        )
    cfg_path = args.out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "llama"
    cfg["architecture"] = architecture
    if hasattr(model.config, "rope_scaling") and "rotary_scaling" not in cfg:
        cfg["rotary_scaling"] = model.config.rope_scaling
    if not args.kv_cache_fp8:
        cfg["quantization"]["kv_cache_quant_algo"] = None
    cfg_path.write_text(json.dumps(cfg, indent=4))

    files = sorted(p.name for p in args.out.iterdir())
    print(json.dumps({"out": str(args.out), "files": files, "seconds": round(time.time() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
