"""Layer-by-layer calibration: amax of every quantized linear's input (and of K/V for an FP8 KV cache).

Only one decoder layer and the calibration activations are in memory at a time, so a 12B model calibrates on a
24 GB machine. Each layer is transformers' own decoder layer class loaded with that layer's weights, so the
activations are exactly what the HF model computes (in the checkpoint's dtype, like modelopt's calibration).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nim_build import families as F
from nim_build.safetensors_io import CheckpointReader
from nim_build.spec import ModelSpec

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LayerAmax:
    qkv_in: torch.Tensor = None     # input of q/k/v proj (after input_layernorm)
    dense_in: torch.Tensor = None   # input of o_proj
    fc_in: torch.Tensor = None      # input of gate/up proj (after post_attention_layernorm)
    proj_in: torch.Tensor = None    # input of down_proj
    k: torch.Tensor = None          # K after RoPE
    v: torch.Tensor = None          # v_proj output


@dataclass
class CalibrationResult:
    layers: list[LayerAmax] = field(default_factory=list)
    num_samples: int = 0
    seq_len: int = 0


def hf_config(model_dir: Path, spec: ModelSpec):
    """transformers config for the family, with RoPE taken from our parser (transformers 4.57 misreads the
    transformers-5 `rope_parameters` spelling and would silently calibrate with rope_theta=10000)."""
    family = F.family_for(spec.architecture)
    mod = importlib.import_module(family.hf_module.replace("modeling_", "configuration_"))
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.pop("dtype", None)
    raw["rope_theta"] = spec.rotary_base
    raw["rope_scaling"] = dict(spec.rotary_scaling, rope_type=spec.rotary_scaling["type"]) if spec.rotary_scaling else None
    raw["head_dim"] = spec.head_size
    raw.pop("torch_dtype", None)
    cfg = getattr(mod, family.config_class)(**raw)
    cfg._attn_implementation = "sdpa"  # causal without an explicit mask
    return cfg


def load_layer(reader: CheckpointReader, spec: ModelSpec, cfg, i: int, dtype: torch.dtype):
    family = F.family_for(spec.architecture)
    cls = getattr(importlib.import_module(family.hf_module), family.layer_class)
    with torch.device("meta"):
        layer = cls(cfg, layer_idx=i)
    prefix = family.layer(i, "")
    state = {name: reader.get(prefix + name).to(dtype) for name in layer.state_dict()}
    layer.load_state_dict(state, assign=True)
    return layer.eval()


def track_rotated_k(amax: "LayerAmax", pos, head_size: int, rope):
    """k_proj output hook recording amax of K after RoPE, computed exactly as the HF attention does."""
    cos, sin = pos

    def hook(mod, args, out):
        k = out.view(*out.shape[:-1], -1, head_size).transpose(1, 2)
        k_rot = rope(k, k, cos, sin)[1]
        t = k_rot.abs().amax().float()
        amax.k = t if amax.k is None else torch.maximum(amax.k, t)
    return hook


@torch.inference_mode()
def calibrate(model_dir: str | Path, spec: ModelSpec, reader: CheckpointReader, calib_ids: torch.Tensor,
              want_kv: bool, batch_size: int = 8, progress=None) -> CalibrationResult:
    """Run calib_ids [n, seq] through the model layer by layer and return per-layer amax values."""
    family = F.family_for(spec.architecture)
    dtype = TORCH_DTYPES[spec.dtype]
    cfg = hf_config(Path(model_dir), spec)
    rotary = getattr(importlib.import_module(family.hf_module), family.rotary_class)(cfg)
    n, seq = calib_ids.shape
    position_ids = torch.arange(seq).unsqueeze(0)
    embed = reader.get(family.embed).to(dtype)
    hidden = [embed[calib_ids[b:b + batch_size]] for b in range(0, n, batch_size)]
    del embed
    pos = rotary(hidden[0], position_ids)
    rope = getattr(importlib.import_module(family.hf_module), "apply_rotary_pos_emb")
    result = CalibrationResult(num_samples=n, seq_len=seq)
    for i in range(spec.num_hidden_layers):
        layer = load_layer(reader, spec, cfg, i, dtype)
        amax = LayerAmax()
        hooks = []

        def track(attr, use_output=False):
            def hook(mod, args, out=None):
                t = (out if use_output else args[0]).detach().abs().amax().float()
                cur = getattr(amax, attr)
                setattr(amax, attr, t if cur is None else torch.maximum(cur, t))
            return hook

        attn, mlp = layer.self_attn, layer.mlp
        hooks.append(attn.q_proj.register_forward_pre_hook(track("qkv_in")))
        hooks.append(attn.o_proj.register_forward_pre_hook(track("dense_in")))
        hooks.append(mlp.gate_proj.register_forward_pre_hook(track("fc_in")))
        hooks.append(mlp.down_proj.register_forward_pre_hook(track("proj_in")))
        if want_kv:
            # modelopt measures K after RoPE (its k_bmm_quantizer sits at the attention matmul), V as projected
            hooks.append(attn.k_proj.register_forward_hook(track_rotated_k(amax, pos, spec.head_size, rope)))
            hooks.append(attn.v_proj.register_forward_hook(track("v", True)))
        for b, h in enumerate(hidden):
            out = layer(h, position_embeddings=pos, position_ids=position_ids)
            hidden[b] = out[0] if isinstance(out, tuple) else out
        for h in hooks:
            h.remove()
        result.layers.append(amax)
        del layer
        if progress is not None:
            progress.update(1)
    return result
