"""Token selection with TensorRT-LLM's logit processing: bias, temperature, penalties, min tokens, bad words,
then greedy or top-k / top-p sampling, and the log probability of the chosen token."""

from __future__ import annotations

import torch

from nim_build.runtime.api import SamplingParams

__all__ = ["SamplingParams", "mask_bad_words", "process_logits", "choose", "log_probs"]


def mask_bad_words(logits: torch.Tensor, bad_words: list[list[int]], context: list[int]) -> None:
    """Forbid the last token of every bad word whose other tokens end the context (single tokens: always)."""
    for w in bad_words:
        head = w[:-1]
        if not head or (len(context) >= len(head) and context[-len(head) :] == head):
            logits[w[-1]] = float("-inf")


def process_logits(
    logits: torch.Tensor, p: SamplingParams, context: list[int], generated: int, end_id: int
) -> torch.Tensor:
    """The logits sampling chooses from (float32 [vocab]; a new tensor when changed): TensorRT-LLM's penalty layer
    then its bad-words layer. `context` is the prompt + the generated tokens (what penalties count), `generated` how
    many tokens were generated so far."""
    end_masked = p.min_tokens > 1 and generated < p.min_tokens and 0 <= end_id < logits.numel()  # 1: TRT-LLM skips
    scaled = p.temperature > 0 and p.temperature != 1.0
    if not (p.embedding_bias is not None or scaled or p.penalized or end_masked or p.bad_words):
        return logits  # nothing to change: no copy on the hot path of plain requests
    x = logits.float().clone()
    if p.embedding_bias is not None:
        x += torch.tensor(p.embedding_bias, dtype=torch.float32)
    if scaled:
        x /= p.temperature
    if p.penalized:
        counts = torch.bincount(torch.tensor(context), minlength=x.numel())[: x.numel()].float()
        seen = counts > 0
        if p.repetition_penalty != 1.0:
            x = torch.where(seen, torch.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty), x)
        x -= p.presence_penalty * seen + p.frequency_penalty * counts
    if end_masked:
        x[end_id] = float("-inf")
    if p.bad_words:
        mask_bad_words(x, p.bad_words, context)
    return x


def _top_k(p: SamplingParams, vocab: int) -> int:
    """The top-k set sampling draws from: 1 for greedy, 0 for the whole vocabulary."""
    return 1 if p.greedy else (p.top_k if 0 < p.top_k < vocab else 0)


def choose(x: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from processed logits: greedy, or top-k then top-p (within the top-k set) sampling."""
    k = _top_k(p, x.numel())
    if k == 1:
        return int(x.argmax())
    if k:
        kth = torch.topk(x, k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest prefix reaching top_p (never empty)
        x = x.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator))


def log_probs(x: torch.Tensor, tok: int, p: SamplingParams) -> tuple[float, float]:
    """(output log prob, cumulative log prob term) of `tok` under processed logits: log-softmax over the vocabulary;
    the output one, with top-k and normalize_log_probs, renormalised over the top-k set (TensorRT-LLM's top-k
    sampling layer: greedy gives 0.0)."""
    logp = torch.log_softmax(x, dim=-1)
    raw = float(logp[tok])
    k = _top_k(p, x.numel())
    if k and p.normalize_log_probs:
        return raw - float(torch.logsumexp(torch.topk(logp, k).values, dim=0)), raw
    return raw, raw
