"""tensorrt_llm for a reference engine: nim_build.runtime.LLMEngine behind the TensorRT-LLM backend's interface.

Same inputs, outputs and parameters as the `tensorrtllm` C++ backend's model (input_ids, input_lengths,
request_output_len, end_id, pad_id, streaming, sampling inputs, stop/bad word lists -> output_ids
[batch, beam, tokens], sequence_length [batch, beam]). Requests join a running in-flight batch: the engine's
step loop runs in a background thread, `execute` only submits; a sender thread streams each request's new
tokens through its decoupled response sender (all tokens in one response when `streaming` is false). A client
that cancels or disconnects has its request cancelled in the engine, which frees its KV blocks; as in the
TensorRT-LLM backend, a request with `stop` = true cancels the in-flight request that has the same request id
(how tensorrt_llm_bls cancels, since Triton 2.51's BLS and ensembles do not forward cancellation).

Parameters: gpt_model_path (the engine directory), exclude_input_in_output, kv_cache_free_gpu_mem_fraction (the
share of the memory left after loading the weights that the KV pool may take), enable_chunked_context, and
nim_build_engine ("module:Class", default nim_build.runtime:LLMEngine; benchmarks use a trivial engine with the same
API). enable_kv_cache_reuse = true and batch_scheduler_policy = max_utilization are refused: the runtime has neither.
Engine statistics are exported as Prometheus gauges (nim_build_engine_*) on the metrics port.
"""

import importlib
import json
import queue
import threading

import numpy as np
import triton_common as tc

from nim_build.errors import UserError
from nim_build.serving.repo import refused_for_reference

pb_utils = tc.pb_utils
CANCEL_POLL_S = 0.05
STATS_KEYS = ("steps", "max_seqs_in_step", "last_step_seqs", "active", "waiting", "free_blocks", "total_blocks")


class _Request:
    __slots__ = (
        "sender",
        "request",
        "streaming",
        "prefix",
        "tokens",
        "rid",
        "done",
        "response",
        "key",
        "lock",
        "closed",
    )

    def __init__(self, request, streaming, prefix):
        self.request = request
        self.sender = request.get_response_sender() if request is not None else None
        self.streaming = streaming
        self.prefix = prefix  # prompt ids to prepend when the input is not excluded from the output
        self.tokens: list[int] = []
        self.rid = None
        self.key = request.request_id() if request is not None else ""
        self.done = threading.Event()
        self.response = None
        # Asking Triton whether a request is cancelled after its final response crashes the server (the
        # response factory is gone): `closed` is set, under `lock`, before the final response is sent.
        self.lock = threading.Lock()
        self.closed = False


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = tc.parameters(cfg)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.exclude_input = tc.is_true(params.get("exclude_input_in_output"), default=True)
        module, _, cls = (params.get("nim_build_engine") or "nim_build.runtime:LLMEngine").partition(":")
        engine_module = importlib.import_module(module)
        engine_cls = getattr(engine_module, cls)
        self.sampling_params = engine_module.SamplingParams
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
        self.logger = pb_utils.Logger
        note = getattr(self.engine, "kv_cache_note", None)
        if note:
            self.logger.log_info(note)
        self.engine.start()
        self.events: queue.Queue = queue.Queue()
        self.active: dict[int, _Request] = {}
        self.by_key: dict[str, _Request] = {}  # request id -> request, for `stop` requests
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.gauges = self._make_gauges()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._send_loop, self._watch_loop)]
        for t in self.threads:
            t.start()

    # -- requests ------------------------------------------------------------------------------------------
    def execute(self, requests):
        pending = []
        responses = [] if not self.decoupled else None
        for request in requests:
            state = None
            try:
                if tc.first(request, "stop", False):
                    self._stop(request)
                    if not self.decoupled:
                        pending.append(self._response(None, []))
                    continue
                prompt, params, streaming = self._parse(request)
                if streaming and not self.decoupled:
                    raise UserError(
                        "streaming needs the decoupled transaction policy (generate the repository "
                        "without --no-decoupled)"
                    )
                state = _Request(
                    request if self.decoupled else None, streaming, [] if self._exclude(request) else prompt
                )
                with self.lock:
                    state.rid = self.engine.submit(prompt, params, lambda ev, s=state: self.events.put((s, ev)))
                    self.active[state.rid] = state
                    if state.key:
                        self.by_key[state.key] = state
                pending.append(state)
            except (UserError, ValueError, TypeError) as e:
                if self.decoupled:
                    sender = state.sender if state is not None else request.get_response_sender()
                    sender.send(tc.error(str(e)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    pending.append(str(e))
        if self.decoupled:
            return None
        for item in pending:  # non-decoupled: wait for every request of this batch, answer in order
            if isinstance(item, str):
                responses.append(tc.error(item))
                continue
            if not isinstance(item, _Request):
                responses.append(item)
                continue
            item.done.wait()
            responses.append(item.response)
        return responses

    def _stop(self, request) -> None:
        """A `stop` request: cancel the in-flight request with the same request id (if any), answer empty."""
        with self.lock:
            target = self.by_key.get(request.request_id())
        if target is not None:
            self.engine.cancel(target.rid)
        if self.decoupled:
            request.get_response_sender().send(
                self._response(None, []), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )

    def _exclude(self, request) -> bool:
        value = tc.first(request, "exclude_input_in_output")
        return self.exclude_input if value is None else bool(value)

    def _parse(self, request):
        ids = tc.array(request, "input_ids")
        if ids is None:
            raise UserError("input_ids is required")
        if ids.ndim > 1 and ids.shape[0] != 1:
            raise UserError(f"send one sequence per request (batch size 1), got batch {ids.shape[0]}")
        ids = ids.reshape(-1)
        length = tc.first(request, "input_lengths")
        if length is not None:
            ids = ids[: int(length)]
        if ids.size == 0:
            raise UserError("the prompt is empty")
        max_new = int(tc.first(request, "request_output_len", 0))
        if max_new <= 0:
            raise UserError(f"request_output_len must be positive, got {max_new}")
        beam = int(tc.first(request, "beam_width", 1))
        if beam != 1:
            raise UserError(f"beam_width {beam} is not supported by the reference runtime (only 1)")
        kwargs = {"max_new_tokens": max_new}
        for name, key, cast in (
            ("temperature", "temperature", float),
            ("runtime_top_k", "top_k", int),
            ("runtime_top_p", "top_p", float),
            ("seed", "seed", int),
            ("end_id", "end_id", int),
        ):
            value = tc.first(request, name)
            if value is not None:
                kwargs[key] = cast(value)
        from nim_build.serving.tokenizer import from_word_list_format

        for name, key in (("stop_words_list", "stop_words"), ("bad_words_list", "bad_words")):
            arr = tc.array(request, name)
            if arr is not None and arr.size:
                kwargs[key] = from_word_list_format(arr)
        streaming = bool(tc.first(request, "streaming", False))
        return ids.astype(np.int64).tolist(), self.sampling_params(**kwargs), streaming

    # -- responses -----------------------------------------------------------------------------------------
    def _response(self, state: _Request, ids: list[int]):
        n = len(ids)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int32).reshape(1, 1, n)),
                pb_utils.Tensor("sequence_length", np.asarray([[n]], dtype=np.int32)),
            ]
        )

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
            # When responses fall behind the engine, a request's waiting tokens go out in one response
            # (streams stay in order; clients concatenate pieces either way).
            merged: dict[int, list] = {}
            for state, ev in batch:
                entry = merged.setdefault(id(state), [state, [], ev])
                entry[1].extend(ev.token_ids)
                entry[2] = ev
            for state, tokens, ev in merged.values():
                self._deliver(state, tokens, ev)

    def _deliver(self, state: _Request, tokens: list[int], ev) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if ev.finished:
                with self.lock:
                    self.active.pop(state.rid, None)
                    if state.key and self.by_key.get(state.key) is state:
                        del self.by_key[state.key]
            if ev.error or ev.finish_reason == "error":
                response = tc.error(f"generation failed: {ev.error}")
            elif state.streaming:
                if not tokens and not ev.finished:
                    return
                response = self._response(state, tokens)
            else:
                state.tokens.extend(tokens)
                if not ev.finished:
                    return
                response = self._response(state, list(state.prefix) + state.tokens)
            if state.sender is not None:
                if ev.finished:
                    with state.lock:
                        state.closed = True
                if ev.finish_reason == "cancelled":
                    state.sender.send(flags=final)
                else:
                    state.sender.send(response, flags=final if ev.finished else 0)
            else:
                state.response = response
            if ev.finished:
                state.done.set()
        except Exception as e:  # a client gone mid-stream: cancel its request, keep serving the others
            self.logger.log_warn(f"tensorrt_llm: response for request {state.rid} not delivered: {e}")
            self.engine.cancel(state.rid)

    def _watch_loop(self):
        """Cancel requests whose client cancelled or disconnected; export engine statistics."""
        best = 0
        while not self.stopping.wait(CANCEL_POLL_S):
            with self.lock:
                states = list(self.active.values())
            for state in states:
                if state.request is None:
                    continue
                with state.lock:
                    cancelled = not state.closed and state.request.is_cancelled()
                if cancelled:
                    self.engine.cancel(state.rid)
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
