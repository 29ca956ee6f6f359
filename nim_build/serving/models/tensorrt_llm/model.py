"""tensorrt_llm for a reference engine: nim_build.runtime.LLMEngine behind the TensorRT-LLM backend's interface.

Same inputs, outputs, parameters and semantics as the `tensorrtllm` C++ backend's model (tensorrtllm_backend
inflight_batcher_llm/src/utils.cc and model_instance_state.cc; docs/TRITON.md): sampling inputs map through
nim_build.runtime.from_trtllm; a request of batch B is B engine requests, and num_return_sequences n makes n per row,
each answered in its own responses (batch_index / sequence_index when asked for); output_ids are [1, 1, len]
(prompt included unless excluded, except when streaming: new tokens only); log probs, context and generation
logits and the perf-metric outputs when asked for; beam_width > 1 is answered with an error naming it.

Requests join a running in-flight batch in both transaction policies: the engine's step loop runs in a background
thread, `execute` only submits and returns, and a sender thread answers each request through its response sender
(one response when the model is not decoupled). A client that cancels or disconnects has its request cancelled in
the engine, which frees its KV blocks. A `stop` request cancels, as in the TensorRT-LLM backend, the requests with
its request id, except those that bring a `stream_key`: the ensemble's do (a random key preprocessing makes per
row, which its client never sees), and its postprocessing, which gets each stream's key in the `stream_key` output
and keys its detokenizer state by it, stops a stream by that key; so no other client can stop it (Triton 2.51's
ensembles do not forward cancellation, and every step of an ensemble carries its client's request id).

Parameters: gpt_model_path (the engine directory), exclude_input_in_output, kv_cache_free_gpu_mem_fraction,
enable_chunked_context, normalize_log_probs (default true, as TensorRT-LLM's), and nim_build_engine ("module:Class",
default nim_build.runtime:LLMEngine; benchmarks use a trivial engine with the same API). enable_kv_cache_reuse = true
and batch_scheduler_policy = max_utilization are refused: the runtime has neither. Engine statistics are exported as
Prometheus gauges (nim_build_engine_*) on the metrics port. The parameter max_queue_size (upstream's `max_queue_size`,
which the C++ backend reads from the dynamic batcher's default_queue_policy: RepoOptions.max_queue_size says why not
here) bounds the requests waiting in the engine: beyond it a request is answered UNAVAILABLE.
"""

import importlib
import json
import math
import queue
import threading

import numpy as np
import triton_common as tc

from nim_build.errors import QUEUE_FULL, UserError
from nim_build.runtime.api import from_trtllm
from nim_build.serving.repo import reference_queue_bound, refused_for_reference
from nim_build.serving.tokenizer import from_word_list_format

pb_utils = tc.pb_utils
CANCEL_POLL_S = 0.05
STATS_KEYS = ("steps", "max_seqs_in_step", "last_step_seqs", "active", "waiting", "free_blocks", "total_blocks")
PERF_OUTPUTS = (
    "kv_cache_alloc_new_blocks",
    "kv_cache_reused_blocks",
    "kv_cache_alloc_total_blocks",
    "arrival_time_ns",
    "first_scheduled_time_ns",
    "first_token_time_ns",
    "last_token_time_ns",
    "acceptance_rate",
    "total_accepted_draft_tokens",
    "total_draft_tokens",
)


class _Call:
    """One Triton request: its response sender and the engine streams (rows x sequences) it is waiting for."""

    __slots__ = ("request", "sender", "streaming", "wanted", "open", "lock", "closed", "key", "keyed", "batch")

    def __init__(self, request, streaming: bool, wanted: set[str], batch: int):
        self.request, self.sender = request, request.get_response_sender()
        self.streaming, self.wanted, self.batch = streaming, wanted, batch
        self.open = 0  # streams not finished yet
        self.key = request.request_id()
        # a request that brings a stream key (the ensemble's, from preprocessing) is stopped by its streams' keys
        # only, never by request id
        self.keyed = tc.array(request, "stream_key") is not None
        # Asking Triton whether a request is cancelled after its final response crashes the server (the
        # response factory is gone): `closed` is set, under `lock`, before the final response is sent.
        self.lock = threading.Lock()
        self.closed = False


class _Stream:
    """One engine request: a (batch row, returned sequence) of a call."""

    __slots__ = (
        "call",
        "rid",
        "row",
        "seq",
        "n",
        "prompt",
        "prefix",
        "params",
        "tokens",
        "log_probs",
        "cum",
        "context_logits",
        "generation_logits",
        "stream_key",
        "arrival",
        "first",
        "last",
    )

    def __init__(self, call, row, seq, n, prompt, prefix, params):
        self.call, self.row, self.seq, self.n = call, row, seq, n
        self.prompt, self.prefix, self.params = prompt, prefix, params
        self.rid = None
        self.tokens: list[int] = []
        self.log_probs: list[float] = []
        self.cum = 0.0
        self.context_logits = None
        self.generation_logits: list = []
        self.stream_key = None  # keyed calls: the row's key + the sequence index
        self.arrival = self.first = self.last = None


class QueueFull(Exception):
    """A request refused because max_queue_size requests are waiting already (answered UNAVAILABLE)."""


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = tc.parameters(cfg)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.exclude_input = tc.is_true(params.get("exclude_input_in_output"), default=True)
        self.normalize_log_probs = tc.is_true(params.get("normalize_log_probs"), default=True)
        module, _, cls = (params.get("nim_build_engine") or "nim_build.runtime:LLMEngine").partition(":")
        engine_cls = getattr(importlib.import_module(module), cls)
        # The TensorRT-LLM backend's parameters the reference runtime implements; the others are refused, never
        # ignored (`nim_build repo` refuses them first).
        why = refused_for_reference(params)
        if why:
            raise UserError(why)
        limits = {"enable_chunked_context": tc.is_true(params.get("enable_chunked_context"))}
        fraction = params.get("kv_cache_free_gpu_mem_fraction")
        if fraction and not fraction.startswith("${"):  # unset: the engine's default (TensorRT-LLM's, 0.9)
            limits["kv_cache_free_mem_fraction"] = float(fraction)
        self.engine = engine_cls.from_engine_dir(
            params["gpt_model_path"], max_batch_size=cfg["max_batch_size"], **limits
        )
        self.tokens_per_block = getattr(self.engine, "tokens_per_block", 1)
        self.max_queue_size = reference_queue_bound(cfg)
        self.logger = pb_utils.Logger
        note = getattr(self.engine, "kv_cache_note", None)
        if note:
            self.logger.log_info(note)
        self.engine.start()
        self.events: queue.Queue = queue.Queue()
        self.active: dict[int, _Stream] = {}  # engine request id -> stream
        self.by_id: dict[str, list[_Call]] = {}  # client request id -> calls a `stop` may cancel
        self.by_key: dict[int, _Stream] = {}  # stream key -> stream (ensemble streams)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.gauges = self._make_gauges()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._send_loop, self._watch_loop)]
        for t in self.threads:
            t.start()

    # -- requests ------------------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            try:
                if _flag(request, "stop"):
                    self._stop(request)
                else:
                    self._submit(request)
            except QueueFull as e:
                request.get_response_sender().send(
                    tc.error(str(e), pb_utils.TritonError.UNAVAILABLE),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
            except Exception as e:
                request.get_response_sender().send(
                    tc.error(tc.error_message(e, "tensorrt_llm")), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                )
        return None  # responses go out through each request's sender, from the send loop

    def _submit(self, request) -> None:
        ids = tc.array(request, "input_ids")
        if ids is None:
            raise UserError("input_ids is required")
        ids = ids.reshape(ids.shape[0], -1) if ids.ndim else ids.reshape(1, 1)
        batch = ids.shape[0]
        streaming = _flag(request, "streaming")
        n = int(tc.row(request, "num_return_sequences", 0, 1))
        if not self.decoupled:
            needs = ((streaming, "streaming"), (batch > 1, "a batch size > 1"), (n > 1, "num_return_sequences > 1"))
            for cond, what in needs:
                if cond:
                    raise UserError(f"{what} needs the decoupled transaction policy (no --no-decoupled)")
        if n < 1:
            raise UserError(f"num_return_sequences must be >= 1, got {n}")
        beam = int(tc.row(request, "beam_width", 0, 1))  # len_penalty, early_stopping: beam search only, unused
        if beam != 1:
            raise UserError(f"beam_width {beam}: the reference runtime decodes one beam (beam_width 1)")
        if tc.array(request, "draft_input_ids") is not None:
            raise UserError("draft_input_ids: the reference runtime has no speculative decoding")
        wanted = set(request.requested_output_names())
        call = _Call(request, streaming, wanted, batch)
        streams = [s for b in range(batch) for s in self._parse_row(request, call, ids, b, n)]
        if self.max_queue_size and self.engine.stats()["waiting"] + len(streams) > self.max_queue_size:
            raise QueueFull(f"{QUEUE_FULL} (max_queue_size {self.max_queue_size}): retry later")
        submitted = []
        try:
            with self.lock:
                for s in streams:
                    s.rid = self.engine.submit(s.prompt, s.params, lambda ev, s=s: self.events.put((s, ev)))
                    submitted.append(s)
                    self.active[s.rid] = s
                    if call.keyed:
                        self.by_key[s.stream_key] = s
                call.open = len(streams)
                if call.key and not call.keyed:
                    self.by_id.setdefault(call.key, []).append(call)
        except Exception:
            for s in submitted:  # all rows or none
                self.engine.cancel(s.rid)
            raise

    def _parse_row(self, request, call: _Call, ids: np.ndarray, b: int, n: int) -> list[_Stream]:
        length = tc.row(request, "input_lengths", b)
        row = ids[b][: int(length)] if length is not None else ids[b]
        if row.size == 0:
            raise UserError("the prompt is empty (input_ids / input_lengths)")
        max_new = int(tc.row(request, "request_output_len", b, 0))
        if max_new <= 0:
            raise UserError(f"request_output_len must be positive, got {max_new}")
        kwargs = {}
        for name, key, cast in (
            ("runtime_top_k", "top_k", int),
            ("runtime_top_p", "top_p", float),
            ("temperature", "temperature", float),
            ("seed", "seed", int),
            ("repetition_penalty", "repetition_penalty", float),
            ("presence_penalty", "presence_penalty", float),
            ("frequency_penalty", "frequency_penalty", float),
            ("min_tokens", "min_tokens", int),
            ("min_length", "min_tokens", int),
            ("return_log_probs", "return_log_probs", bool),
            ("return_context_logits", "return_context_logits", bool),
            ("return_generation_logits", "return_generation_logits", bool),
        ):
            value = tc.row(request, name, b)
            if value is not None:
                kwargs[key] = cast(value)
        end_id = tc.row(request, "end_id", b)
        kwargs["end_id"] = -1 if end_id is None else int(end_id)  # TensorRT-LLM: no end id -> none
        for name, key in (("stop_words_list", "stop_words"), ("bad_words_list", "bad_words")):
            arr = tc.array(request, name)
            if arr is not None and arr.size:
                arr = arr.reshape(-1, 2, arr.shape[-1])
                kwargs[key] = from_word_list_format(tc.row_of(arr, b, name), name)
        bias = tc.array(request, "embedding_bias")
        if bias is not None and bias.size:
            bias = bias.reshape(-1, bias.shape[-1])
            kwargs["embedding_bias"] = tc.row_of(bias, b, "embedding_bias").astype(np.float32).tolist()
        prompt = row.astype(np.int64).tolist()
        exclude = tc.row(request, "exclude_input_in_output", b)
        exclude = self.exclude_input if exclude is None else bool(exclude)
        streams = []
        for seq in range(n):
            seq_kwargs = dict(kwargs)
            if n > 1 and seq_kwargs.get("seed") is not None:
                seq_kwargs["seed"] += seq  # TensorRT-LLM's child requests: seed + sequence index
            params = from_trtllm(max_new, normalize_log_probs=self.normalize_log_probs, **seq_kwargs)
            stream = _Stream(call, b, seq, n, prompt, [] if exclude else prompt, params)
            if call.keyed:
                stream.stream_key = (int(tc.row(request, "stream_key", b)) + seq) % 2**64
            streams.append(stream)
        return streams

    def _stop(self, request) -> None:
        """A `stop` request: cancel the requests it names, answer one empty final response (as upstream)."""
        key = tc.row(request, "stream_key", 0)
        with self.lock:
            if key is not None:
                target = self.by_key.get(int(key))
                streams = [target] if target is not None else []
            else:
                if not request.request_id():
                    raise UserError("stop: a stop request needs the request id of the request to stop")
                calls = self.by_id.get(request.request_id(), [])
                streams = [s for s in self.active.values() if s.call in calls]
        for s in streams:
            what = f"stream {key} (its ensemble client left)" if key is not None else f"request '{s.call.key}'"
            self.logger.log_info(f"tensorrt_llm: {what} stopped by a stop request")
            self.engine.cancel(s.rid)
        request.get_response_sender().send(
            pb_utils.InferenceResponse(output_tensors=[]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        )

    # -- responses -----------------------------------------------------------------------------------------
    def _send_loop(self):
        while not self.stopping.is_set():
            try:
                batch = [self.events.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < 4096:
                try:
                    batch.append(self.events.get_nowait())
                except queue.Empty:
                    break
            # When responses fall behind the engine, a stream's waiting tokens go out in one response
            # (streams stay in order; clients concatenate pieces either way).
            merged: dict[int, list] = {}
            for s, ev in batch:
                entry = merged.setdefault(id(s), [s, [], ev])
                entry[1].append(ev)
                entry[2] = ev
            for s, events, last in merged.values():
                self._deliver(s, events, last)

    def _deliver(self, s: _Stream, events: list, last) -> None:
        final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        call = s.call
        new = [t for ev in events for t in ev.token_ids]
        for ev in events:
            s.tokens.extend(ev.token_ids)
            if ev.log_probs is not None:
                s.log_probs.extend(ev.log_probs)
                s.cum = ev.cum_log_prob
            if ev.context_logits is not None:
                s.context_logits = ev.context_logits
            if ev.generation_logits:
                s.generation_logits.extend(ev.generation_logits)
        s.arrival, s.first, s.last = last.arrival, last.first_token, last.last_token
        try:
            if last.finished:
                with self.lock:
                    self.active.pop(s.rid, None)
                    self.by_key.pop(s.stream_key, None)
                    call.open -= 1
                    ends_call = call.open == 0
                    if ends_call and call.key in self.by_id:
                        rest = [c for c in self.by_id[call.key] if c is not call]
                        if rest:
                            self.by_id[call.key] = rest
                        else:
                            del self.by_id[call.key]
            else:
                ends_call = False
            flags = final_flag if ends_call else 0
            if last.error or last.finish_reason == "error":
                response = tc.error(f"generation failed: {last.error}")
            elif call.streaming:
                if not new and not last.finished:
                    return
                response = None if (last.finish_reason == "cancelled" and not new) else self._response(s, new)
            elif last.finished:
                response = self._response(s, list(s.prefix) + s.tokens)
            else:
                return
            if ends_call:
                with call.lock:
                    call.closed = True
            if response is None:
                if flags:
                    call.sender.send(flags=flags)
            else:
                call.sender.send(response, flags=flags)
        except Exception as e:  # a client gone mid-stream: cancel its request, keep serving the others
            self.logger.log_warn(f"tensorrt_llm: response for request {s.rid} not delivered: {e}")
            self.engine.cancel(s.rid)

    def _response(self, s: _Stream, ids: list[int]):
        """One response of stream `s` with output ids `ids` and the optional outputs its request asked for."""
        call, p = s.call, s.params
        out = [
            pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int32).reshape(1, 1, len(ids))),
            pb_utils.Tensor("sequence_length", np.asarray([[len(ids)]], dtype=np.int32)),
        ]
        if p.return_log_probs:
            out.append(pb_utils.Tensor("cum_log_probs", np.asarray([[s.cum]], dtype=np.float32)))
            lp = np.asarray(s.log_probs, dtype=np.float32).reshape(1, 1, -1)
            out.append(pb_utils.Tensor("output_log_probs", lp))
        if p.return_context_logits and s.context_logits is not None:
            out.append(pb_utils.Tensor("context_logits", s.context_logits.numpy()[None]))
        if p.return_generation_logits and s.generation_logits:
            rows = np.stack([r.numpy() for r in s.generation_logits])
            if call.streaming:  # [1, new tokens, beam, vocab], the rows of this response
                rows = rows[-len(ids) :] if ids else rows[:0]
                out.append(pb_utils.Tensor("generation_logits", rows[None, :, None]))
            else:  # [1, beam, max_new_tokens, vocab]: TensorRT-LLM's buffer, rows past the end are zero
                full = np.zeros((p.max_new_tokens, rows.shape[-1]), dtype=np.float32)
                full[: len(rows)] = rows
                out.append(pb_utils.Tensor("generation_logits", full[None, None]))
        if "batch_index" in call.wanted and call.batch > 1:
            out.append(pb_utils.Tensor("batch_index", np.asarray([[s.row]], dtype=np.int32)))
        if "sequence_index" in call.wanted and s.n > 1:
            out.append(pb_utils.Tensor("sequence_index", np.asarray([[s.seq]], dtype=np.int32)))
        if call.keyed and call.streaming:  # postprocessing keys its stream state by it
            out.append(pb_utils.Tensor("stream_key", np.asarray([[s.stream_key]], dtype=np.uint64)))
        if _flag(call.request, "return_perf_metrics"):
            out += self._perf_metrics(s)
        return pb_utils.InferenceResponse(output_tensors=out)

    def _perf_metrics(self, s: _Stream) -> list:
        blocks = math.ceil((len(s.prompt) + s.params.max_new_tokens) / self.tokens_per_block)

        def ns(t):
            return int(t * 1e9) if t is not None else 0

        values = {
            "kv_cache_alloc_new_blocks": blocks,  # guaranteed_no_evict: every block at admission, none reused
            "kv_cache_reused_blocks": 0,
            "kv_cache_alloc_total_blocks": blocks,
            "arrival_time_ns": ns(s.arrival),
            "first_scheduled_time_ns": ns(s.arrival),
            "first_token_time_ns": ns(s.first),
            "last_token_time_ns": ns(s.last),
            "acceptance_rate": 0.0,
            "total_accepted_draft_tokens": 0,
            "total_draft_tokens": 0,
        }
        dtypes = {"acceptance_rate": np.float32}
        return [
            pb_utils.Tensor(k, np.asarray([[v]], dtype=dtypes.get(k, np.int64 if k.endswith("_ns") else np.int32)))
            for k, v in values.items()
            if k in s.call.wanted
        ]

    def _watch_loop(self):
        """Cancel requests whose client cancelled or disconnected; export engine statistics."""
        best = 0
        while not self.stopping.wait(CANCEL_POLL_S):
            with self.lock:
                streams = list(self.active.values())
            for s in streams:
                with s.call.lock:
                    cancelled = not s.call.closed and s.call.request.is_cancelled()
                if cancelled:
                    self.engine.cancel(s.rid)
            stats = self.engine.stats()
            for key, gauge in self.gauges.items():
                gauge.set(float(stats.get(key, 0)))
            if stats.get("max_seqs_in_step", 0) > best:
                best = stats["max_seqs_in_step"]
                self.logger.log_info(f"tensorrt_llm: in-flight batch reached {best} sequences in one step")

    def _make_gauges(self):
        family = pb_utils.MetricFamily(
            name="nim_build_engine",
            description="nim_build reference engine statistics "
            "(label stat: steps, max_seqs_in_step, last_step_seqs, active, waiting, "
            "free_blocks, total_blocks)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.metric_family = family  # must outlive its metrics
        return {key: family.Metric(labels={"stat": key}) for key in STATS_KEYS}

    def finalize(self):
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=5)
        self.engine.shutdown()


def _flag(request, name: str) -> bool:
    return bool(tc.first(request, name, False))
