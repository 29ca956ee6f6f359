"""Accuracy gate: does the checkpoint handed to TensorRT-LLM compute the same function as the Hugging Face model?

`evaluate` runs the original model (transformers' own decoder layers, float32) and the checkpoint (the reference
runtime's full-sequence forward, float32 compute, FP8 weights and activations as TensorRT-LLM rounds them) on the
same token batches and compares their next-token distributions and per-layer hidden states. `check_gate` turns
the report into failures, with a per-layer diagnosis of where the error first jumps.

Memory: the HF reference runs one decoder layer at a time (like calibration), so only the FP8 checkpoint is held
whole: about one byte per parameter (Mistral NeMo 12B: ~13 GB).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from nim_build.builder.manifest import CHECKPOINT_DIR
from nim_build.builder.source import SourceModel
from nim_build.options import DEFAULT_GATE


def evaluate(
    source: SourceModel,
    engine_or_checkpoint_dir: str | Path,
    token_batches: Iterable,
    *,
    fake_quant_activations: bool | None = None,
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None = None,
) -> dict:
    """Compare the HF model (source) with the checkpoint on token_batches (each [batch, seq] ids, a list of id lists
    or one id list). Returns a JSON-ready report:
    tokens, top1_agreement, mean_kl (KL(HF || ours) per token, nats), max_abs_logit_error,
    ppl_reference, ppl_quantized, ppl_increase (relative), layer_rel_error ([embeddings, layer 0 .. last layer
    after the final norm]: ||h_ours - h_hf|| / ||h_hf|| over all tokens).
    forward: what computes the checkpoint's side, batch [B, S] -> (logits [B*S, vocab], hidden states [B*S, hidden]
    each); default the reference runtime on the checkpoint in engine_or_checkpoint_dir (the ONNX backend passes
    ONNX Runtime's)."""
    from nim_build.builder.calibrate import reference_forward

    forward = forward or _runtime_forward(engine_or_checkpoint_dir, fake_quant_activations)
    acc = {"tokens": 0, "agree": 0, "kl": 0.0, "max_err": 0.0, "nll_hf": 0.0, "nll_q": 0.0, "targets": 0}
    diff2 = ref2 = None
    for batch in _batches(token_batches):
        ref_logits, hs_ref = reference_forward(source, batch)
        logits, hidden = forward(batch)
        _accumulate(acc, ref_logits, logits, batch)
        if len(hs_ref) != len(hidden):
            raise RuntimeError(f"HF returned {len(hs_ref)} hidden states, the checkpoint's side {len(hidden)}")
        d2 = torch.tensor([(a - b.float()).pow(2).sum().item() for a, b in zip(hs_ref, hidden)])
        r2 = torch.tensor([a.pow(2).sum().item() for a in hs_ref])
        diff2, ref2 = (d2, r2) if diff2 is None else (diff2 + d2, ref2 + r2)
    if acc["tokens"] == 0:
        raise ValueError("evaluate needs at least one non-empty token batch")
    ppl_hf = math.exp(acc["nll_hf"] / max(acc["targets"], 1))
    ppl_q = math.exp(acc["nll_q"] / max(acc["targets"], 1))
    return {
        "tokens": acc["tokens"],
        "top1_agreement": acc["agree"] / acc["tokens"],
        "mean_kl": acc["kl"] / acc["tokens"],
        "max_abs_logit_error": acc["max_err"],
        "ppl_reference": ppl_hf,
        "ppl_quantized": ppl_q,
        "ppl_increase": ppl_q / ppl_hf - 1.0,
        "layer_rel_error": [float(x) for x in (diff2 / ref2.clamp(min=1e-30)).sqrt()],
    }


def _runtime_forward(engine_or_checkpoint_dir: str | Path, fake_quant_activations: bool | None):
    """The reference runtime's full-sequence forward over the checkpoint, float32 compute."""
    from nim_build.runtime.model import DecoderModel, SeqChunk

    ckpt = Path(engine_or_checkpoint_dir)
    if (ckpt / CHECKPOINT_DIR / "config.json").is_file():
        ckpt = ckpt / CHECKPOINT_DIR
    ours = DecoderModel.from_checkpoint(
        ckpt, compute_dtype=torch.float32, fake_quant_activations=fake_quant_activations
    )

    def forward(batch: torch.Tensor):
        with torch.inference_mode():
            o = ours.forward(
                batch.reshape(-1),
                [SeqChunk(0, batch.shape[1])] * batch.shape[0],
                all_logits=True,
                output_hidden_states=True,
            )
        return o.logits, o.hidden_states

    return forward


def _batches(token_batches) -> Iterable[torch.Tensor]:
    if hasattr(token_batches, "shape") or (
        isinstance(token_batches, list) and token_batches and isinstance(token_batches[0], int)
    ):
        token_batches = [token_batches]  # one tensor / array / id list: a single batch
    for b in token_batches:
        t = torch.as_tensor(b, dtype=torch.long)
        t = t[None] if t.dim() == 1 else t
        if t.numel():
            yield t


def _accumulate(acc: dict, ref: torch.Tensor, ours: torch.Tensor, batch: torch.Tensor) -> None:
    lp_ref, lp_q = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    acc["tokens"] += ref.shape[0]
    acc["agree"] += int((ref.argmax(-1) == ours.argmax(-1)).sum())
    acc["kl"] += float((lp_ref.exp() * (lp_ref - lp_q)).sum())
    acc["max_err"] = max(acc["max_err"], float((ref - ours).abs().max()))
    seq = batch.shape[1]
    if seq > 1:  # position t predicts token t + 1
        targets = batch[:, 1:].reshape(-1, 1)
        keep = lambda lp: lp.reshape(batch.shape[0], seq, -1)[:, :-1].reshape(-1, lp.shape[-1])  # noqa: E731
        acc["nll_hf"] -= float(keep(lp_ref).gather(1, targets).sum())
        acc["nll_q"] -= float(keep(lp_q).gather(1, targets).sum())
        acc["targets"] += targets.numel()


def check_gate(report: dict, min_top1: float = DEFAULT_GATE[0], max_ppl_increase: float = DEFAULT_GATE[1]) -> list[str]:
    """Failures of the gate (empty: passed); a failing gate ends with the per-layer diagnosis."""
    failures = []
    if report["top1_agreement"] < min_top1:
        failures.append(f"top-1 agreement {report['top1_agreement']:.4f} < {min_top1} over {report['tokens']} tokens")
    if report["ppl_increase"] > max_ppl_increase:
        failures.append(
            f"perplexity {report['ppl_quantized']:.4f} vs {report['ppl_reference']:.4f} "
            f"(+{report['ppl_increase']:.2%}) exceeds +{max_ppl_increase:.2%}"
        )
    if failures:
        failures.append(diagnose(report))
    return failures


def diagnose(report: dict) -> str:
    """Which layer's hidden-state error jumps: the layer adding the most relative error to the residual stream
    (a wrong tensor mapping or scale shows as one large step; FP8 rounding as small steps everywhere)."""
    errs = report["layer_rel_error"]
    names = ["embeddings"] + [f"layer {i}" for i in range(len(errs) - 2)] + [f"layer {len(errs) - 2} + final norm"]
    i = max(range(1, len(errs)), key=lambda j: errs[j] - errs[j - 1])
    worst = max(range(len(errs)), key=errs.__getitem__)
    growth = f", x{errs[i] / errs[i - 1]:.1f}" if errs[i - 1] > 1e-9 else ""
    return (
        f"diagnosis: hidden-state relative error jumps at {names[i]} ({errs[i - 1]:.3g} -> {errs[i]:.3g}"
        f"{growth}); largest at {names[worst]} ({errs[worst]:.3g}); check that layer's weights, scales and "
        f"tensor mapping"
    )
