"""Per-request sampling parameters and token selection (greedy, temperature, top-k, top-p, bad words)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nim_build.errors import UserError


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off, 1 -> greedy
    top_p: float = 1.0
    seed: int | None = None
    end_id: int | None = None  # None -> the engine's end id; -1 -> never stop on an end id
    stop_words: list[list[int]] = field(default_factory=list)  # stop sequences (not included in the output)
    bad_words: list[list[int]] = field(default_factory=list)  # never generated

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not w for w in self.stop_words + self.bad_words):
            raise UserError("stop_words and bad_words entries must be non-empty token lists")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def mask_bad_words(logits: torch.Tensor, bad_words: list[list[int]], context: list[int]) -> None:
    """Forbid the last token of every bad word whose other tokens end the context (single tokens: always)."""
    for w in bad_words:
        head = w[:-1]
        if not head or (len(context) >= len(head) and context[-len(head) :] == head):
            logits[w[-1]] = float("-inf")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from float32 logits [vocab]."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the smallest prefix reaching top_p (never empty)
        logits = logits.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
