"""tensorrt_llm_bls: the ensemble's job in one model, with exact streaming detokenization.

Takes the ensemble's inputs (text_input or messages, max_tokens, sampling, penalties, stop/bad words, embedding
bias, stream, num_return_sequences, return_* flags), tokenizes in process, calls the `tensorrt_llm` model (reference
runtime or TensorRT-LLM backend alike) through BLS, one call per row of the request, and detokenizes each
returned sequence's token stream incrementally: streamed pieces never end inside a character and their
concatenation is the one-shot decode. Log probs, logits, batch_index / sequence_index and the perf metrics are
passed on from tensorrt_llm, as upstream's BLS does. Each request runs in its own thread, so requests overlap and
join the engine's in-flight batch, in both transaction policies (the non-decoupled model answers through its
response sender too, once). A cancelled request cancels its `tensorrt_llm` calls, whose ids are random.
"""

import json
import threading
import uuid

import numpy as np
import triton_common as tc

from nim_build.errors import UserError
from nim_build.serving.repo import EXTRA_OUTPUTS, LLM_NAMES, SAMPLING_INPUTS

pb_utils = tc.pb_utils
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PASSED_ON = [name for name, *_ in EXTRA_OUTPUTS]  # tensorrt_llm outputs the BLS returns as they are
SAMPLING_DTYPES = {"TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_UINT64": np.uint64, "TYPE_BOOL": np.bool_}


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = tc.parameters(cfg)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.llm = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
        self.tok, meta = tc.load_tokenizer(args, params)
        self.max_seq_len = meta.get("max_seq_len")
        self.vocab_size = meta.get("vocab_size") or self.tok.vocab_size

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._run, args=(request, request.get_response_sender()), daemon=True).start()
        return None

    def _run(self, request, sender):
        """Serve one request: one tensorrt_llm call per row, responses streamed or one per returned sequence."""
        try:
            rows = tc.batch_size(request, "text_input", "messages", "max_tokens")
            streaming = bool(tc.first(request, "stream", False))
            n = int(tc.first(request, "num_return_sequences", 1))
            if not self.decoupled and (streaming or rows > 1 or n > 1):
                raise UserError(
                    "streaming, a batch size > 1 and num_return_sequences > 1 need the decoupled transaction policy"
                )
            wanted = set(request.requested_output_names())
            # every row's words and bias at once (one [rows, ...] tensor each), then every row validated before any runs
            words = {src: tc.word_lists(self.tok, request, src, rows) for src in ("stop_words", "bad_words")}
            bias = tc.embedding_bias(
                self.tok, self.vocab_size, request, rows, "embedding_bias_words", "embedding_bias_weights"
            )
            calls = [self._call(request, b, words, bias, wanted) for b in range(rows)]
            running = [(call, call.exec(decoupled=True)) for call in calls]  # every row joins the engine's batch now
            pending = None
            for response in (
                r
                for b, (call, it) in enumerate(running)
                for r in self._answers(request, call, it, b, rows, streaming, wanted)
            ):
                if pending is not None:
                    sender.send(pending)
                pending = response
            if pending is None or request.is_cancelled():
                sender.send(flags=FINAL)
            else:
                sender.send(pending, flags=FINAL)
        except Exception as e:  # every request gets an answer, even on an unexpected failure
            sender.send(tc.error(tc.error_message(e, "tensorrt_llm_bls")), flags=FINAL)

    def _call(self, request, b: int, words: dict, bias: np.ndarray, wanted: set[str]):
        """The tensorrt_llm request for row b (with a random id: only this model can stop it)."""
        ids, max_tokens = tc.prompt(
            request,
            self.tok,
            self.max_seq_len,
            messages="messages",
            text_input="text_input",
            max_tokens="max_tokens",
            b=b,
        )
        end_id, pad_id = tc.row(request, "end_id", b), tc.row(request, "pad_id", b)
        inputs = [
            tc.tensor("input_ids", [ids], np.int32),
            tc.tensor("input_lengths", [[len(ids)]], np.int32),
            tc.tensor("request_output_len", [[max_tokens]], np.int32),
            tc.tensor("end_id", [[self.tok.end_id if end_id is None else int(end_id)]], np.int32),
            tc.tensor("pad_id", [[self.tok.pad_id if pad_id is None else int(pad_id)]], np.int32),
        ]
        exclude = tc.row(request, "exclude_input_in_output", b)  # absent: tensorrt_llm's own default
        if exclude is not None:
            inputs.append(tc.tensor("exclude_input_in_output", [[bool(exclude)]], np.bool_))
        for name, dtype, *_ in SAMPLING_INPUTS:
            value = tc.row(request, name, b)
            if value is not None:
                inputs.append(tc.tensor(LLM_NAMES.get(name, name), [[value]], SAMPLING_DTYPES[dtype]))
        for src, dst in (("stop_words", "stop_words_list"), ("bad_words", "bad_words_list")):
            if (words[src][b, 1] >= 0).any():
                inputs.append(tc.tensor(dst, words[src][b : b + 1], np.int32))
        if bias.size:
            inputs.append(tc.tensor("embedding_bias", bias[b : b + 1], np.float32))
        outputs = ["output_ids", "sequence_length", "sequence_index"] + [o for o in PASSED_ON if o in wanted]
        return pb_utils.InferenceRequest(
            model_name=self.llm, inputs=inputs, request_id=uuid.uuid4().hex, requested_output_names=outputs
        )

    def _answers(self, request, call, responses, b: int, rows: int, streaming: bool, wanted: set[str]):
        """Row b's responses: each streamed piece, or each returned sequence's whole text."""
        decoders = {}
        for response in responses:
            if request.is_cancelled():
                tc.stop_llm_request(self.llm, call.request_id())
                return
            if response.has_error():
                raise UserError(response.error().message())
            out = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if out is None:  # the empty final response
                continue
            seq = _scalar(response, "sequence_index", 0)
            length = int(pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy().reshape(-1)[0])
            decoder = decoders.setdefault(seq, self.tok.stream_decoder())
            piece = decoder.step(out.as_numpy().reshape(-1)[:length].tolist())
            yield self._response(piece if streaming else piece + decoder.flush(), response, b, rows, seq, wanted)
        if streaming:
            for seq, decoder in decoders.items():
                tail = decoder.flush()
                if tail:
                    yield self._response(tail, None, b, rows, seq, wanted)

    @staticmethod
    def _response(text: str, llm_response, b: int, rows: int, seq: int, wanted: set[str]):
        out = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        for name in PASSED_ON:
            t = pb_utils.get_output_tensor_by_name(llm_response, name) if llm_response is not None else None
            if t is not None and name != "batch_index":
                out.append(pb_utils.Tensor(name, t.as_numpy()))
        if "batch_index" in wanted and rows > 1:
            out.append(pb_utils.Tensor("batch_index", np.array([[b]], dtype=np.int32)))
        if llm_response is None and "sequence_index" in wanted and seq:
            out.append(pb_utils.Tensor("sequence_index", np.array([[seq]], dtype=np.int32)))
        return pb_utils.InferenceResponse(output_tensors=out)


def _scalar(response, name: str, default: int) -> int:
    t = pb_utils.get_output_tensor_by_name(response, name)
    return default if t is None else int(t.as_numpy().reshape(-1)[0])
