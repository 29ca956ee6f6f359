"""Layer-by-layer calibration: amax of every quantized linear's input (and of K/V for an FP8 KV cache).

Only one decoder layer and the calibration activations are in memory at a time, so a 12B model calibrates on a
24 GB machine. Each layer is transformers' own decoder layer class loaded with that layer's weights, so the
activations are exactly what the HF model computes (in the checkpoint's dtype, like modelopt's calibration).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from nim_build.builder import families as F
from nim_build.builder.source import SourceModel
from nim_build.formats import torch_dtype

# HF weight suffixes of one decoder layer
LAYER_WEIGHTS = (F.INPUT_NORM, F.Q, F.K, F.V, F.O, F.POST_NORM, F.GATE, F.UP, F.DOWN)


@dataclass
class LayerAmax:
    qkv_in: torch.Tensor = None  # input of q/k/v proj (after input_layernorm)
    dense_in: torch.Tensor = None  # input of o_proj
    fc_in: torch.Tensor = None  # input of gate/up proj (after post_attention_layernorm)
    proj_in: torch.Tensor = None  # input of down_proj
    k: torch.Tensor = None  # K after RoPE
    v: torch.Tensor = None  # v_proj output


def read_layer(reader, family: F.Family, i: int) -> dict[str, torch.Tensor]:
    """The HF weights of decoder layer i, by suffix (LAYER_WEIGHTS)."""
    return {sfx: reader.get(family.layer(i, sfx)) for sfx in LAYER_WEIGHTS}


def hf_config(source: SourceModel):
    """transformers config for the family, with RoPE taken from our parser (transformers 4.57 misreads the
    transformers-5 `rope_parameters` spelling and would silently calibrate with rope_theta=10000)."""
    spec, family = source.spec, source.family
    mod = importlib.import_module(family.hf_module.replace("modeling_", "configuration_"))
    raw = dict(source.config)
    raw.pop("rope_parameters", None)
    raw.pop("dtype", None)
    raw["rope_theta"] = spec.rotary_base
    raw["rope_scaling"] = (
        dict(spec.rotary_scaling, rope_type=spec.rotary_scaling["type"]) if spec.rotary_scaling else None
    )
    raw["head_dim"] = spec.head_size
    raw.pop("torch_dtype", None)
    cfg = getattr(mod, family.config_class)(**raw)
    cfg._attn_implementation = "sdpa"  # causal without an explicit mask
    return cfg


def track_rotated_k(amax: LayerAmax, pos, head_size: int, rope):
    """k_proj output hook recording amax of K after RoPE, computed exactly as the HF attention does."""
    cos, sin = pos

    def hook(mod, args, out):
        k = out.view(*out.shape[:-1], -1, head_size).transpose(1, 2)
        k_rot = rope(k, k, cos, sin)[1]
        t = k_rot.abs().amax().float()
        amax.k = t if amax.k is None else torch.maximum(amax.k, t)

    return hook


class LayerCalibrator:
    """Runs the calibration batch through the decoder one layer at a time, given each layer's HF weights.

    The caller streams the weights (and reuses them to write the quantized layer), so each layer is read once.
    The accuracy gate uses the same class, in float32, as its layer-by-layer reference forward pass.
    """

    def __init__(
        self,
        source: SourceModel,
        calib_ids: torch.Tensor,
        want_kv: bool,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
    ):
        self.family = source.family
        self.module = importlib.import_module(self.family.hf_module)
        self.spec, self.want_kv = source.spec, want_kv
        self.dtype = dtype or torch_dtype(self.spec.dtype)
        self.cfg = hf_config(source)
        n, seq = calib_ids.shape
        self.position_ids = torch.arange(seq).unsqueeze(0)
        embedding = source.reader.get(self.family.embed).to(self.dtype)  # dropped once the batch is embedded
        self.hidden = [embedding[calib_ids[b : b + batch_size]] for b in range(0, n, batch_size)]
        rotary = getattr(self.module, self.family.rotary_class)(self.cfg)
        self.pos = rotary(self.hidden[0], self.position_ids)

    @torch.inference_mode()
    def run_layer(self, i: int, weights: dict[str, torch.Tensor]) -> LayerAmax:
        """Advance the activations through layer i (weights: HF suffix -> tensor); return its amax values."""
        with torch.device("meta"):
            layer = getattr(self.module, self.family.layer_class)(self.cfg, layer_idx=i)
        layer.load_state_dict({k: weights[k].to(self.dtype) for k in layer.state_dict()}, assign=True)
        layer.eval()
        amax = LayerAmax()

        def track(attr, use_output=False):
            def hook(mod, args, out=None):
                t = (out if use_output else args[0]).detach().abs().amax().float()
                cur = getattr(amax, attr)
                setattr(amax, attr, t if cur is None else torch.maximum(cur, t))

            return hook

        attn, mlp = layer.self_attn, layer.mlp
        hooks = [
            attn.q_proj.register_forward_pre_hook(track("qkv_in")),
            attn.o_proj.register_forward_pre_hook(track("dense_in")),
            mlp.gate_proj.register_forward_pre_hook(track("fc_in")),
            mlp.down_proj.register_forward_pre_hook(track("proj_in")),
        ]
        if self.want_kv:
            # modelopt measures K after RoPE (its k_bmm_quantizer sits at the attention matmul), V as projected
            rope = self.module.apply_rotary_pos_emb
            hooks.append(attn.k_proj.register_forward_hook(track_rotated_k(amax, self.pos, self.spec.head_size, rope)))
            hooks.append(attn.v_proj.register_forward_hook(track("v", True)))
        for b, h in enumerate(self.hidden):
            out = layer(h, position_embeddings=self.pos, position_ids=self.position_ids)
            self.hidden[b] = out[0] if isinstance(out, tuple) else out
        for h in hooks:
            h.remove()
        return amax


@torch.inference_mode()
def reference_forward(source: SourceModel, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' forward pass in float32, computed one decoder layer at a time (memory: one layer).

    Returns (logits [n * seq, vocab], hidden states as output_hidden_states=True gives them: the embeddings, the
    output of every layer but the last, and the last one after the final norm; each [n * seq, hidden])."""
    spec, fam, reader = source.spec, source.family, source.reader
    runner = LayerCalibrator(source, ids, want_kv=False, batch_size=ids.shape[0], dtype=torch.float32)
    flat = lambda: runner.hidden[0].reshape(-1, spec.hidden_size).clone()  # noqa: E731
    hidden = [flat()]
    for i in range(spec.num_hidden_layers):
        runner.run_layer(i, read_layer(reader, fam, i))
        hidden.append(flat())
    norm = getattr(runner.module, fam.norm_class)(spec.hidden_size, eps=spec.norm_epsilon)
    norm.weight.data = reader.get(fam.final_norm).float()
    hidden[-1] = norm(hidden[-1])
    logits = hidden[-1] @ reader.get(fam.head_source(spec.tie_word_embeddings, reader)).float().T
    return logits, hidden
