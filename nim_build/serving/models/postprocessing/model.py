"""postprocessing: token ids -> text, incrementally for streaming.

OUTPUT is flat, one string per (batch, beam) entry, as upstream's (tensorrtllm_backend c2e65b8). In a streaming
ensemble each partial response of `tensorrt_llm` (only the new tokens) arrives here as its own request, and the
detokenizer state of a stream is kept per stream: by STREAM_KEY (the random key the reference tensorrt_llm gives
each stream of an ensemble request), else by request id. Pieces never end inside a UTF-8 character and spaces are
neither dropped nor doubled. Keyed by request id (the TensorRT-LLM backend), a stream needs a unique request id
(`nim_build infer` sets one); there is a single postprocessing instance (the generator configures one, in order).
Requests without either are decoded on their own, which is exact for one-shot responses. Idle stream states are
dropped after `STATE_TTL_S`.

Cancellation: Triton 2.51 does not cancel an ensemble's running `tensorrt_llm` step when its client goes away,
but the steps it schedules after that arrive here marked cancelled (this model has no dynamic batcher, which would
drop them unseen). The first one sends `tensorrt_llm` a `stop` request for the stream (by its key, else by its
request id), so the engine ends the request and frees its KV blocks one token after the client left. Cancelled
steps are still answered with their text, never with an error: Triton 2.51 never completes an ensemble request one
of whose decoupled steps answered an error, and holds it in flight until its exit timeout runs out at shutdown.
"""

import json
import threading
import time
from collections import OrderedDict

import numpy as np
import triton_common as tc

STATE_TTL_S = 120.0
MAX_STATES = 4096  # far above the streams one engine instance runs at once (its max batch + queue)


class TritonPythonModel:
    def initialize(self, args):
        params = tc.parameters(json.loads(args["model_config"]))
        self.tok, _ = tc.load_tokenizer(args, params)
        self.llm = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
        self.states: OrderedDict[str, tuple[object, float]] = OrderedDict()
        self.cancelled: OrderedDict[str, None] = OrderedDict()  # streams already stopped, oldest first
        self.lock = threading.Lock()

    def execute(self, requests):
        responses = []
        now = time.monotonic()
        for request in requests:
            try:
                responses.append(self._one(request, now))
            except Exception as e:
                responses.append(tc.error(tc.error_message(e, "postprocessing")))
        self._expire(now)
        return responses

    def _one(self, request, now: float):
        tokens = tc.array(request, "TOKENS_BATCH")
        lengths = tc.array(request, "SEQUENCE_LENGTH")
        # [batch, beam, len] and [batch, beam]: decode each (batch, beam) entry (len may be 0: an empty final
        # response of a stream that ended on its end id).
        if tokens.ndim == 2:
            tokens = tokens[:, None, :]
        lengths = lengths.reshape(tokens.shape[0], tokens.shape[1])
        stream_key = tc.first(request, "STREAM_KEY")
        key = f"k{stream_key}" if stream_key is not None else request.request_id()
        if key and request.is_cancelled():
            self._stop_once(key, request.request_id(), stream_key)
        one = tokens.shape[0] == 1 and tokens.shape[1] == 1
        texts = []
        for b in range(tokens.shape[0]):
            for beam in range(tokens.shape[1]):
                n = int(lengths[b, beam])
                if not 0 <= n <= tokens.shape[2]:
                    raise ValueError(f"SEQUENCE_LENGTH {n} is outside 0..{tokens.shape[2]} (TOKENS_BATCH's length)")
                ids = tokens[b, beam, :n].tolist()
                texts.append(self._stream_piece(key, ids, now) if key and one else self.tok.decode(ids))
        return tc.pb_utils.InferenceResponse(
            output_tensors=[tc.pb_utils.Tensor("OUTPUT", np.array([t.encode("utf-8") for t in texts], np.object_))]
        )

    def _stop_once(self, key: str, request_id: str, stream_key) -> None:
        with self.lock:
            first = key not in self.cancelled
            self.cancelled[key] = None
            while len(self.cancelled) > MAX_STATES:
                self.cancelled.popitem(last=False)
        if first:  # once per stream (its later steps arrive cancelled too)
            tc.stop_llm_request(self.llm, request_id, stream_key)

    def _stream_piece(self, key: str, ids: list[int], now: float) -> str:
        with self.lock:
            entry = self.states.pop(key, None)
            decoder = entry[0] if entry else self.tok.stream_decoder()
            self.states[key] = (decoder, now)
        return decoder.step(ids)

    def _expire(self, now: float) -> None:
        with self.lock:
            while self.states:
                key, (_, last) = next(iter(self.states.items()))
                if now - last < STATE_TTL_S and len(self.states) <= MAX_STATES:
                    break
                self.states.popitem(last=False)
