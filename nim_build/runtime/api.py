"""The runtime's request and event types (no torch: the trivial benchmark engine shares them), and how the
TensorRT-LLM backend's sampling inputs map onto them (docs/TRITON.md, "Sampling semantics")."""

from __future__ import annotations

from dataclasses import dataclass, field

from nim_build.errors import UserError


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 -> greedy; otherwise logits are divided by it before sampling
    top_k: int = 0  # 0 -> off, 1 -> greedy
    top_p: float = 1.0
    seed: int | None = None
    end_id: int | None = None  # None -> the engine's end id; -1 -> never stop on an end id
    stop_words: list[list[int]] = field(default_factory=list)  # stop sequences (included in the output)
    bad_words: list[list[int]] = field(default_factory=list)  # never generated
    # TensorRT-LLM's penalties, in its order: bias, temperature, repetition, presence, frequency (counts over the
    # prompt and the generated tokens), then min_tokens masks the end id, then bad words.
    repetition_penalty: float = 1.0  # > 0: positive logits of seen tokens divided by it, negative multiplied
    presence_penalty: float = 0.0  # subtracted once from the logit of every seen token
    frequency_penalty: float = 0.0  # subtracted once per occurrence
    min_tokens: int = 1  # > 1: the end id cannot be generated before this many tokens (<= 1: no effect)
    embedding_bias: list[float] | None = None  # [vocab], added to the logits first
    return_log_probs: bool = False  # TokenEvent.log_probs / cum_log_prob
    # TensorRT-LLM's normalize_log_probs: with top-k (greedy is top-1), output log probs are renormalised over the
    # top-k set (greedy: 0.0); cum_log_prob never is.
    normalize_log_probs: bool = True
    return_context_logits: bool = False  # TokenEvent.context_logits, on the first event
    return_generation_logits: bool = False  # TokenEvent.generation_logits, one row per new token

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise UserError for a bad value; with vocab_size, also for token ids and a bias outside it."""
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise UserError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if any(not w for w in self.stop_words + self.bad_words):
            raise UserError("stop_words and bad_words entries must be non-empty token lists")
        if vocab_size is None:
            return
        for name, words in (("stop_words", self.stop_words), ("bad_words", self.bad_words)):
            bad = next((i for w in words for i in w if not 0 <= i < vocab_size), None)
            if bad is not None:
                raise UserError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
        if self.embedding_bias is not None and len(self.embedding_bias) != vocab_size:
            raise UserError(f"embedding_bias has {len(self.embedding_bias)} values; the vocabulary has {vocab_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def from_trtllm(
    max_new_tokens: int,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    **other,
) -> SamplingParams:
    """SamplingParams for the TensorRT-LLM backend's inputs (None = input absent), with its rules:
    runtime_top_p <= 0 is unset; top_k and top_p both unset (or 0) is greedy whatever the temperature; top_k > 0
    without top_p is pure top-k; top_p without top_k is nucleus sampling over the whole vocabulary; temperature
    defaults to 1.0 and 0 means greedy; penalties and min_tokens keep TensorRT-LLM's defaults."""
    if top_p is not None and top_p <= 0:
        top_p = None
    if top_p is not None and top_p > 1:
        raise UserError(f"runtime_top_p must be at most 1, got {top_p}")
    if top_k is not None and top_k < 0:
        raise UserError(f"runtime_top_k must be >= 0, got {top_k}")
    if temperature is not None and temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    k = top_k or 0
    if temperature == 0 or (k == 0 and top_p is None):
        k = 1  # greedy; the temperature still scales the log probs, as in TensorRT-LLM
    return SamplingParams(
        max_new_tokens,
        temperature=1.0 if temperature in (None, 0) else float(temperature),
        top_k=k,
        top_p=1.0 if top_p is None else float(top_p),
        **other,
    )


@dataclass
class TokenEvent:
    request_id: int
    token_ids: list[int]  # tokens new since the previous event of this request
    finished: bool
    finish_reason: str | None  # "end_id" | "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    arrival: float | None = None  # time.monotonic() of submit
    first_token: float | None = None
    last_token: float | None = None
    log_probs: list[float] | None = None  # one per new token (return_log_probs)
    cum_log_prob: float | None = None  # of every token so far (return_log_probs)
    context_logits: object | None = None  # float32 [prompt_len, vocab] tensor, first event (return_context_logits)
    generation_logits: list | None = None  # float32 [vocab] per new token (return_generation_logits)
