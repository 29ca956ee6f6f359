#!/usr/bin/env python
"""Re-derive an oracle checkpoint from the HF model with plain torch, and compare bit for bit.

    python tests/oracle/verify_facts.py --model HF_DIR --calib-ids IDS.npy --oracle OUT_DIR

Evidence for the facts in tests/oracle/README.md, not a converter: it recomputes every tensor the
oracle wrote (modelopt_export.py, same --tp and --kv-cache-fp8 as read back from OUT_DIR/config.json)
from the formulas stated there and prints the first mismatch, or "ALL EQUAL (n tensors)".
Calibration is one full-precision forward of the HF model (attention as loaded by default) with hooks:
linear inputs and K (after RoPE, before GQA repeat) / V as the model computes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

E4M3_MAX = 448.0


def calibrate(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """amax (in the model dtype) of every decoder linear's input, and of K after RoPE and V."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    amax: dict[str, torch.Tensor] = {}

    def upd(key, t):
        a = t.detach().abs().max()
        amax[key] = a if key not in amax else torch.maximum(amax[key], a)

    hooks = []
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: upd(n + ".in", a[0])))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    store: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        at = layer.self_attn
        hooks.append(at.k_proj.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(f"k{i}", o)))
        hooks.append(at.v_proj.register_forward_hook(lambda m, a, o, i=i: upd(f"{i}.v", o)))
    with torch.no_grad():
        b, s = ids.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=model.dtype), pos)
        model(input_ids=ids)
        for i in range(len(model.model.layers)):
            k = store[f"k{i}"].view(b, s, -1, head_dim).transpose(1, 2)
            _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
            upd(f"{i}.k", k_rot)
    for h in hooks:
        h.remove()
    return amax


def expected(model, amax, tp: int, kv_fp8: bool, dtype) -> list[dict[str, torch.Tensor]]:
    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    sd = {k: v for k, v in model.state_dict().items()}

    def sc(a):  # per-tensor scale: float32(amax) / 448, shape [1]
        return (a.float() / E4M3_MAX).reshape(1)

    def q8(w, s):  # bf16 weight / float32 [1] scale -> float32 division, then a plain cast
        return (w / s).to(torch.float8_e4m3fn)

    def wamax(*ws):
        return torch.max(torch.stack([w.abs().max() for w in ws]))

    def pad_rows(w):
        r = (-w.shape[0]) % tp
        return torch.nn.functional.pad(w, (0, 0, 0, r)) if r else w

    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    emb = pad_rows(sd["model.embed_tokens.weight"]).chunk(tp, 0)
    head = pad_rows(sd.get("lm_head.weight", sd["model.embed_tokens.weight"])).chunk(tp, 0)
    for r in range(tp):
        ranks[r]["transformer.vocab_embedding.weight"] = emb[r].to(dtype)
        ranks[r]["lm_head.weight"] = head[r].to(dtype)
        ranks[r]["transformer.ln_f.weight"] = sd["model.norm.weight"].to(dtype)
    for i in range(cfg.num_hidden_layers):
        p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
        q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        o = sd[p + "self_attn.o_proj.weight"]
        g, u, d = (sd[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
        qkv_ws = sc(wamax(q, k, v))
        qkv_as = sc(torch.max(torch.stack([amax[f"{i}.self_attn.{x}_proj.in"] for x in "qkv"])))
        fc_ws = sc(wamax(g, u))
        fc_as = sc(torch.max(amax[f"{i}.mlp.gate_proj.in"], amax[f"{i}.mlp.up_proj.in"]))
        if tp > nkv:  # replicate each KV head tp/nkv times (repeat_interleave over heads)
            k = k.view(nkv, hd, -1).repeat_interleave(tp // nkv, 0).reshape(-1, k.shape[1])
            v = v.view(nkv, hd, -1).repeat_interleave(tp // nkv, 0).reshape(-1, v.shape[1])
        for r in range(tp):
            R = ranks[r]
            qkv = torch.cat([q.chunk(tp, 0)[r], k.chunk(tp, 0)[r], v.chunk(tp, 0)[r]])
            R[t + "attention.qkv.weight"] = q8(qkv, qkv_ws)
            R[t + "attention.qkv.weights_scaling_factor"] = qkv_ws
            R[t + "attention.qkv.activation_scaling_factor"] = qkv_as
            ws = sc(o.abs().max())
            R[t + "attention.dense.weight"] = q8(o.chunk(tp, 1)[r], ws)
            R[t + "attention.dense.weights_scaling_factor"] = ws
            R[t + "attention.dense.activation_scaling_factor"] = sc(amax[f"{i}.self_attn.o_proj.in"])
            R[t + "mlp.fc.weight"] = q8(g.chunk(tp, 0)[r], fc_ws)
            R[t + "mlp.gate.weight"] = q8(u.chunk(tp, 0)[r], fc_ws)
            for n in ("fc", "gate"):
                R[t + f"mlp.{n}.weights_scaling_factor"] = fc_ws
                R[t + f"mlp.{n}.activation_scaling_factor"] = fc_as
            ws = sc(d.abs().max())
            R[t + "mlp.proj.weight"] = q8(d.chunk(tp, 1)[r], ws)
            R[t + "mlp.proj.weights_scaling_factor"] = ws
            R[t + "mlp.proj.activation_scaling_factor"] = sc(amax[f"{i}.mlp.down_proj.in"])
            R[t + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"].to(dtype)
            R[t + "post_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"].to(dtype)
            if kv_fp8:
                one = torch.ones(1)
                ks = torch.maximum(sc(amax[f"{i}.k"]), one)
                vs = torch.maximum(sc(amax[f"{i}.v"]), one)
                R[t + "attention.k_cache_scaling_factor"] = ks
                R[t + "attention.v_cache_scaling_factor"] = vs
                R[t + "attention.kv_cache_scaling_factor"] = torch.maximum(ks, vs)
    return ranks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--calib-ids", required=True, type=Path)
    ap.add_argument("--oracle", required=True, type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    ocfg = json.loads((args.oracle / "config.json").read_text())
    tp = ocfg["mapping"]["tp_size"]
    kv_fp8 = ocfg["quantization"]["kv_cache_quant_algo"] == "FP8"
    hf_cfg = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=hf_cfg.dtype).eval()
    ids = torch.from_numpy(np.load(args.calib_ids).astype(np.int64))
    amax = calibrate(model, ids)
    want = expected(model, amax, tp, kv_fp8, getattr(torch, ocfg["dtype"]))
    n = 0
    for r in range(tp):
        got = load_file(args.oracle / f"rank{r}.safetensors")
        if set(got) != set(want[r]):
            print(
                f"rank{r}: names differ: only oracle {sorted(set(got) - set(want[r]))}, "
                f"only expected {sorted(set(want[r]) - set(got))}"
            )
            return 1
        for k in sorted(got):
            a, b = got[k], want[r][k]
            same = (
                a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(
                    a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                    b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b,
                )
            )
            if not same:
                print(
                    f"rank{r} {k}: oracle {a.dtype}{tuple(a.shape)} {a.flatten()[:4].tolist()} "
                    f"!= expected {b.dtype}{tuple(b.shape)} {b.flatten()[:4].tolist()}"
                )
                return 1
            n += 1
    print(f"ALL EQUAL ({n} tensors, tp={tp}, kv_fp8={kv_fp8}, attn={model.config._attn_implementation})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
