"""postprocessing: token ids -> text, incrementally for streaming.

In a streaming ensemble each partial response of `tensorrt_llm` (only the new tokens) arrives here as its own
request. The ensemble gives every step the client's request id, so the detokenizer state of a stream is kept
per request id: pieces never end inside a UTF-8 character and spaces are neither dropped nor doubled. This
needs a unique request id per streaming request (`nim_build infer` sets one) and a single postprocessing
instance (the generator configures one, in order). Requests without an id are decoded on their own, which is
exact for one-shot responses. Idle stream states are dropped after `STATE_TTL_S`.

Cancellation: Triton 2.51 does not cancel an ensemble's running `tensorrt_llm` step when its client goes away,
but the steps it schedules after that arrive here marked cancelled (this model has no dynamic batcher, which would
drop them unseen). The first one sends `tensorrt_llm` a `stop` request with the stream's id, so the engine ends the
request and frees its KV blocks one token after the client left.
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
        self.cancelled: OrderedDict[str, None] = OrderedDict()  # request ids already stopped, oldest first
        self.lock = threading.Lock()

    def execute(self, requests):
        responses = []
        now = time.monotonic()
        for request in requests:
            tokens = tc.array(request, "TOKENS_BATCH")
            lengths = tc.array(request, "SEQUENCE_LENGTH")
            # [batch, beam, len] and [batch, beam]: decode each (batch, beam) entry (len may be 0: an empty
            # final response of a stream that ended on its end id).
            if tokens.ndim == 2:
                tokens = tokens[:, None, :]
            lengths = lengths.reshape(tokens.shape[0], tokens.shape[1])
            key = request.request_id()
            if key and request.is_cancelled():
                responses.append(self._cancel(key))
                continue
            texts = []
            for b in range(tokens.shape[0]):
                row = []
                for beam in range(tokens.shape[1]):
                    ids = tokens[b, beam, : int(lengths[b, beam])].tolist()
                    if key and tokens.shape[0] == 1 and tokens.shape[1] == 1:
                        row.append(self._stream_piece(key, ids, now))
                    else:
                        row.append(self.tok.decode(ids))
                texts.append([t.encode("utf-8") for t in row])
            responses.append(
                tc.pb_utils.InferenceResponse(
                    output_tensors=[tc.pb_utils.Tensor("OUTPUT", np.array(texts, dtype=np.object_))]
                )
            )
        self._expire(now)
        return responses

    def _cancel(self, key: str):
        with self.lock:
            self.states.pop(key, None)
            first = key not in self.cancelled
            self.cancelled[key] = None
            while len(self.cancelled) > MAX_STATES:
                self.cancelled.popitem(last=False)
        if first:  # once per stream (its later steps arrive cancelled too)
            tc.stop_llm_request(self.llm, key)
        return tc.error("the request was cancelled")

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
