"""LLMEngine: in-flight batching over the reference decoder (docs/RUNTIME_API.md).

Each step is one forward pass over every scheduled sequence, packed without padding: one decode token of each
running request first, then prefill chunks (of running requests whose prompt is not yet in the cache, then of
newly admitted ones) within `max_num_tokens` tokens and `max_batch_size` sequences. KV blocks are taken from a
fixed pool; admission follows TensorRT-LLM's `guaranteed_no_evict` policy: a request is admitted (in arrival order)
only when blocks for its prompt + max_new_tokens are free, so a running request never runs out of cache.
Without chunked context (TensorRT-LLM's enable_chunked_context, off by default there and here) a prompt is
computed in one step, so it may not be longer than max_num_tokens.

The KV pool holds what max_batch_size sequences of max_seq_len can use, or kv_cache_free_mem_fraction of the
memory left after loading the weights when that is less: on CPU the memory this process may still take within
its container's limit (nim_build.limits), on CUDA the GPU's free memory. CPU pages are committed as blocks are
first used, so a pool sized for the worst case costs only what is used.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nim_build import KV_CACHE_FREE_MEM_FRACTION, TOKENS_PER_BLOCK, limits, options
from nim_build.builder.manifest import CHECKPOINT_DIR, load_manifest
from nim_build.errors import UserError
from nim_build.runtime.api import SamplingParams, TokenEvent
from nim_build.runtime.kv_cache import BlockAllocator, PagedKVCache
from nim_build.runtime.model import DecoderModel, SeqChunk, serving_compute_dtype
from nim_build.runtime.sampling import choose, log_probs, process_logits

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = options.default("max_batch_size")  # an engine directory's limits, where it records none
DEFAULT_MAX_NUM_TOKENS = options.default("max_num_tokens")


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    callback: Callable[[TokenEvent], None]
    end_id: int
    generator: torch.Generator | None
    arrival: float
    tokens: list[int] = field(default_factory=list)  # prompt + generated: what the cache will hold
    generated: list[int] = field(default_factory=list)  # output tokens
    computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    first_token: float | None = None
    last_token: float | None = None
    done: bool = False
    cum_log_prob: float = 0.0
    context_logits: list[torch.Tensor] = field(default_factory=list)  # prompt rows so far (return_context_logits)

    def event(self, tokens: list[int], reason: str | None = None, error: str | None = None, **extra) -> TokenEvent:
        return TokenEvent(
            self.id, tokens, reason is not None, reason, error, self.arrival, self.first_token, self.last_token, **extra
        )


class LLMEngine:
    def __init__(
        self,
        model: DecoderModel,
        *,
        max_seq_len: int,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS,
        kv_cache_bytes: int | None = None,
        kv_cache_free_mem_fraction: float = KV_CACHE_FREE_MEM_FRACTION,
        enable_chunked_context: bool = False,
        tokens_per_block: int = TOKENS_PER_BLOCK,
        end_id: int | None = None,
        pad_id: int | None = None,
    ):
        c = model.cfg
        self.model = model
        self.max_seq_len, self.max_batch_size, self.max_num_tokens = max_seq_len, max_batch_size, max_num_tokens
        self.end_id = end_id if end_id is not None else -1
        self.pad_id = pad_id if pad_id is not None else self.end_id
        self.vocab_size = c.vocab_size
        if max_num_tokens < tokens_per_block:
            raise UserError(
                f"max_num_tokens={max_num_tokens} is less than one KV block ({tokens_per_block} tokens): "
                "prompts could never be scheduled; raise max_num_tokens"
            )
        self.tokens_per_block = tokens_per_block
        self.enable_chunked_context = enable_chunked_context
        kv_scales = model.kv_scales()
        elem = PagedKVCache.element_bytes(kv_scales is not None, model.dtype)
        per_block = PagedKVCache.bytes_per_block(c.num_layers, tokens_per_block, c.num_kv_heads, c.head_size, elem)
        need = PagedKVCache.full_need(
            c.num_layers, tokens_per_block, c.num_kv_heads, c.head_size, elem, max_batch_size, max_seq_len
        )
        if kv_cache_bytes is None:
            kv_cache_bytes, why = kv_pool_bytes(model.device, need, kv_cache_free_mem_fraction)
        else:
            why = "as given"
        num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise UserError(
                f"the KV cache gets {kv_cache_bytes} bytes ({why}), less than one KV block ({per_block} "
                "bytes); give the process more memory or raise kv_cache_free_gpu_mem_fraction"
            )
        self.kv_cache_note = (
            f"KV cache: {num_blocks} blocks of {tokens_per_block} tokens, "
            f"{num_blocks * per_block / 2**20:.0f} MiB ({why})"
        )
        log.info(self.kv_cache_note)
        self.allocator = BlockAllocator(num_blocks)
        # No parallel op here (CPU pages come zeroed from calloc), so no OpenMP team on this thread.
        self.cache = PagedKVCache(
            c.num_layers,
            num_blocks,
            tokens_per_block,
            c.num_kv_heads,
            c.head_size,
            model.dtype,
            model.device,
            kv_scales,
        )
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._events: list[tuple[_Request, TokenEvent]] = []  # produced outside the loop (cancel), sent by it
        self._lock = threading.RLock()
        self._step_lock = threading.Lock()  # one step at a time, whoever calls it
        self._wake = threading.Condition(self._lock)
        self._next_id = 1
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stats = {"steps": 0, "max_seqs_in_step": 0, "last_step_seqs": 0, "last_step_tokens": 0}

    @classmethod
    def from_engine_dir(
        cls,
        engine_dir: str | Path,
        *,
        device: str = "auto",
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        kv_cache_bytes: int | None = None,
        kv_cache_free_mem_fraction: float = KV_CACHE_FREE_MEM_FRACTION,
        enable_chunked_context: bool = False,
        tokens_per_block: int = TOKENS_PER_BLOCK,
        compute_dtype: torch.dtype | None = None,
        fake_quant_activations: bool | None = None,
    ) -> LLMEngine:
        """Serve ENGINE/checkpoint/ with limits from ENGINE/manifest.json (build section) unless given here."""
        manifest = load_manifest(engine_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = DecoderModel.from_checkpoint(
            Path(engine_dir) / CHECKPOINT_DIR,
            device=device,
            compute_dtype=compute_dtype or serving_compute_dtype(device),
            fake_quant_activations=fake_quant_activations,
        )
        build = manifest.get("build") or {}
        tok = manifest.get("tokenizer") or {}
        return cls(
            model,
            max_seq_len=build.get("max_seq_len") or model.cfg.max_position_embeddings,
            max_batch_size=max_batch_size or build.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE,
            max_num_tokens=max_num_tokens or build.get("max_num_tokens") or DEFAULT_MAX_NUM_TOKENS,
            kv_cache_bytes=kv_cache_bytes,
            kv_cache_free_mem_fraction=kv_cache_free_mem_fraction,
            enable_chunked_context=enable_chunked_context,
            tokens_per_block=tokens_per_block,
            end_id=tok.get("end_id"),
            pad_id=tok.get("pad_id"),
        )

    # -- public API ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the step loop in a daemon thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._loop, name="nim_build-engine", daemon=True)
                self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, callback: Callable[[TokenEvent], None]) -> int:
        prompt = [int(t) for t in prompt_ids]
        params.validate(self.vocab_size)
        if not prompt:
            raise UserError("empty prompt: give at least one token")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise UserError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"max_seq_len {self.max_seq_len}; shorten the prompt or ask for fewer tokens"
            )
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise UserError(f"prompt token ids must be in [0, {self.vocab_size})")
        if not self.enable_chunked_context and len(prompt) > self.max_num_tokens:
            raise UserError(
                f"the prompt ({len(prompt)} tokens) is longer than max_num_tokens {self.max_num_tokens}, "
                "and chunked context is off; shorten it, or enable chunked context "
                "(nim_build repo --enable-chunked-context)"
            )
        if self._blocks_needed(len(prompt), params) > self.allocator.total:
            raise UserError(
                f"prompt + max_new_tokens needs more KV cache than the whole pool "
                f"({self.allocator.total} blocks of {self.tokens_per_block} tokens); give more kv_cache_bytes"
            )
        end_id = self.end_id if params.end_id is None else params.end_id
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            req = _Request(
                rid,
                prompt,
                params,
                callback,
                end_id,
                None if params.greedy else _generator(params.seed),
                time.monotonic(),
                tokens=list(prompt),
            )
            self._waiting.append(req)
            self._wake.notify()
        return rid

    def cancel(self, request_id: int) -> None:
        """Stop a request and free its KV blocks now; its final event (reason "cancelled") comes from the loop."""
        with self._lock:
            for queue in (self._waiting, self._running):
                for req in queue:
                    if req.id == request_id and not req.done:
                        queue.remove(req)
                        self._finish(req)
                        self._events.append((req, req.event([], "cancelled")))
                        self._wake.notify()
                        return

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Submit and wait; returns the generated tokens (stop sequences and the end id excluded)."""
        out: list[int] = []
        done = threading.Event()
        final: list[TokenEvent] = []

        def collect(ev: TokenEvent) -> None:
            out.extend(ev.token_ids)
            if ev.finished:
                final.append(ev)
                done.set()

        self.start()
        self.submit(prompt_ids, params, collect)
        done.wait()
        if final[0].finish_reason == "error":
            raise RuntimeError(f"generation failed: {final[0].error}")
        return out

    def stats(self) -> dict:
        with self._lock:
            return {
                **self._stats,
                "active": len(self._running),
                "waiting": len(self._waiting),
                "free_blocks": self.allocator.num_free,
                "total_blocks": self.allocator.total,
            }

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._events)

    def step(self) -> None:
        """One scheduling step + forward pass (the loop calls it; tests may drive it directly instead)."""
        with self._step_lock:
            with self._lock:
                events, self._events = self._events, []
                batch = self._schedule()
            if batch:
                events += self._run(batch)
        for req, ev in events:
            try:
                req.callback(ev)
            except Exception:  # a broken consumer must not stop the other requests
                log.exception("callback of request %d raised; cancelling it", req.id)
                self.cancel(req.id)

    # -- internals -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self._waiting or self._running or self._events):
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # never leave waiters hanging: fail what is running, keep the loop alive
                log.exception("engine step failed")
                with self._lock:
                    self._events += [self._fail(req, e) for req in list(self._running)]

    def _blocks_needed(self, prompt_len: int, params: SamplingParams) -> int:
        return math.ceil(min(prompt_len + params.max_new_tokens, self.max_seq_len) / self.tokens_per_block)

    def _schedule(self) -> list[tuple[_Request, int]]:
        budget, batch = self.max_num_tokens, []
        decode = [r for r in self._running if len(r.tokens) - r.computed == 1]
        prefill = [r for r in self._running if len(r.tokens) - r.computed > 1]
        for req in decode + prefill:
            n = self._chunk(req, budget)
            if n > 0:
                batch.append((req, n))
                budget -= n
        while self._waiting and len(self._running) < self.max_batch_size and budget > 0:
            req = self._waiting[0]
            n = self._chunk(req, budget)
            if n == 0:
                break  # no room in this step's budget: a whole block, or without chunked context the prompt
            blocks = self.allocator.allocate(self._blocks_needed(len(req.prompt), req.params))
            if blocks is None:
                break  # guaranteed_no_evict: wait for running requests to finish (arrival order kept)
            self._waiting.popleft()
            req.blocks = blocks
            self._running.append(req)
            batch.append((req, n))
            budget -= n
        return batch

    def _chunk(self, req: _Request, budget: int) -> int:
        """Tokens of `req` to compute this step: the rest of it when it fits; else, with chunked context, as many
        whole KV blocks as fit (chunks end on block boundaries whatever the load, which keeps the model's attention
        tiles, and so its numbers, the same as when the request runs alone), without it none (it waits)."""
        left = len(req.tokens) - req.computed
        if left <= budget:
            return left
        return budget // self.tokens_per_block * self.tokens_per_block if self.enable_chunked_context else 0

    def _run(self, batch: list[tuple[_Request, int]]) -> list[tuple[_Request, TokenEvent]]:
        ids = torch.tensor([t for req, n in batch for t in req.tokens[req.computed : req.computed + n]])
        chunks = [SeqChunk(req.computed, n, req.blocks) for req, n in batch]
        # Every row's logits only when a prompt chunk here asks for its context logits (the last rows are the same).
        context = any(r.params.return_context_logits and r.computed < len(r.prompt) for r, _ in batch)
        try:
            logits = self.model.forward(ids, chunks, self.cache, all_logits=context).logits.cpu()
            if context:
                ends = torch.tensor([n for _, n in batch]).cumsum(0)
                for (req, n), end in zip(batch, ends.tolist()):
                    if req.params.return_context_logits and req.computed < len(req.prompt):
                        req.context_logits.append(logits[end - n : end - n + min(n, len(req.prompt) - req.computed)])
                logits = logits[ends - 1]
        except Exception as e:  # fail this step's requests, keep serving
            log.exception("forward pass failed")
            with self._lock:
                return [self._fail(req, e) for req, _ in batch if not req.done]
        now = time.monotonic()
        events = []
        with self._lock:
            self._stats["steps"] += 1
            self._stats["last_step_seqs"] = len(batch)
            self._stats["last_step_tokens"] = int(ids.numel())
            self._stats["max_seqs_in_step"] = max(self._stats["max_seqs_in_step"], len(batch))
            for (req, n), row in zip(batch, logits):
                if req.done:  # cancelled during the forward pass
                    continue
                req.computed += n
                if req.computed == len(req.tokens):
                    try:
                        ev = self._append(req, row, now)
                    except Exception as e:  # a sampling failure ends this request only
                        log.exception("request %d failed", req.id)
                        ev = self._fail(req, e)[1]
                    if ev is not None:
                        events.append((req, ev))
        return events

    def _append(self, req: _Request, logits: torch.Tensor, now: float) -> TokenEvent | None:
        """Sample the next token and apply the stop conditions (as TensorRT-LLM: the end id is not output, a stop
        sequence is); the event to send."""
        p = req.params
        x = process_logits(logits, p, req.tokens, len(req.generated), req.end_id)
        tok = choose(x, p, req.generator)
        req.first_token = req.first_token or now
        req.last_token = now
        extra = {}
        if p.return_context_logits and not req.generated:
            extra["context_logits"] = torch.cat(req.context_logits)
            req.context_logits = []
        reason = None
        if tok == req.end_id:
            reason, new = "end_id", []
        else:
            req.tokens.append(tok)
            req.generated.append(tok)
            new = [tok]
            if p.return_log_probs:
                out, raw = log_probs(x, tok, p)
                req.cum_log_prob += raw
                extra.update(log_probs=[out], cum_log_prob=req.cum_log_prob)
            if p.return_generation_logits:
                extra["generation_logits"] = [logits.float()]
            if any(req.tokens[-len(w) :] == w for w in p.stop_words):  # may straddle the prompt, as upstream
                reason = "stop"
            elif len(req.generated) >= p.max_new_tokens or len(req.tokens) >= self.max_seq_len:
                reason = "length"
        if reason:
            self._finish(req)
            if p.return_log_probs and "cum_log_prob" not in extra:
                extra.update(log_probs=[], cum_log_prob=req.cum_log_prob)
        return req.event(new, reason, **extra)

    def _finish(self, req: _Request) -> None:
        """Mark done and free the blocks at once (caller holds the lock)."""
        req.done = True
        if req in self._running:
            self._running.remove(req)
        self.allocator.free(req.blocks)
        req.blocks = []

    def _fail(self, req: _Request, error: Exception) -> tuple[_Request, TokenEvent]:
        """Finish `req` because of `error`; its final event (caller holds the lock)."""
        self._finish(req)
        return req, req.event([], "error", f"{type(error).__name__}: {error}")


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def kv_pool_bytes(device: torch.device, need: int, fraction: float) -> tuple[int, str]:
    """Bytes for the KV pool and why: the full need when it fits in `fraction` of the memory left, else that."""
    if not 0 < fraction <= 1:
        raise UserError(f"kv_cache_free_gpu_mem_fraction must be in (0, 1], got {fraction}")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        left = f"{free / 2**30:.1f} GiB free on {torch.cuda.get_device_name(device)}"
    else:
        mem = limits.memory()
        free, left = mem.available, mem.describe()
    budget = int(free * fraction)
    if need <= budget:
        return need, f"enough for max_batch_size x max_seq_len, within {fraction:g} of {left}"
    return budget, f"{fraction:g} of {left}; max_batch_size x max_seq_len would need {need / 2**30:.1f} GiB"
