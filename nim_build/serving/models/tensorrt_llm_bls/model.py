"""tensorrt_llm_bls: the ensemble's job in one model, with exact streaming detokenization.

Takes the ensemble's inputs (text_input or messages, max_tokens, sampling, stop/bad words, stream), tokenizes
in process, calls the `tensorrt_llm` model (reference runtime or TensorRT-LLM backend alike) through BLS and
detokenizes its token stream incrementally per request: streamed pieces never end inside a character and
their concatenation is the one-shot decode. Each request runs in its own thread, so requests overlap and join
the engine's in-flight batch. A cancelled request cancels its `tensorrt_llm` request.
"""

import json
import threading
import uuid

import numpy as np
import triton_common as tc

from nim_build.errors import UserError
from nim_build.serving.tokenizer import to_word_list_format

pb_utils = tc.pb_utils
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = tc.parameters(cfg)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.llm = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
        self.tok, meta = tc.load_tokenizer(args, params)
        self.max_seq_len = meta.get("max_seq_len")

    def execute(self, requests):
        if not self.decoupled:
            return [self._run(request, None) for request in requests]
        for request in requests:
            sender = request.get_response_sender()
            threading.Thread(target=self._run, args=(request, sender), daemon=True).start()
        return None

    def _run(self, request, sender):
        """Serve one request; with a sender (decoupled) stream responses, else return the single response."""
        try:
            inputs, streaming = self._llm_inputs(request)
            if streaming and sender is None:
                raise UserError("streaming needs the decoupled transaction policy")
            inner_id = uuid.uuid4().hex
            llm_request = pb_utils.InferenceRequest(
                model_name=self.llm,
                inputs=inputs,
                request_id=inner_id,
                requested_output_names=["output_ids", "sequence_length"],
            )
            decoder = self.tok.stream_decoder()
            pieces = []
            if sender is None:
                self._consume(llm_request.exec(), decoder, pieces)
                return self._text(pieces + [decoder.flush()])
            responses = llm_request.exec(decoupled=True)
            for piece in self._iterate(responses, decoder, request, inner_id):
                if streaming and piece:
                    sender.send(self._text([piece]))
                elif not streaming:
                    pieces.append(piece)
            tail = decoder.flush()
            if request.is_cancelled():
                sender.send(flags=FINAL)
            else:
                sender.send(self._text([tail] if streaming else pieces + [tail]), flags=FINAL)
        except Exception as e:  # every request gets an answer, even on an unexpected failure
            message = (
                str(e)
                if isinstance(e, (UserError, ValueError, pb_utils.TritonModelException))
                else f"tensorrt_llm_bls internal error: {type(e).__name__}: {e}"
            )
            if sender is None:
                return tc.error(message)
            sender.send(tc.error(message), flags=FINAL)
        return None

    def _iterate(self, responses, decoder, request, inner_id=""):
        for response in responses:
            if request.is_cancelled():
                tc.stop_llm_request(self.llm, inner_id)
                return
            if response.has_error():
                raise UserError(response.error().message())
            out = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if out is None:  # the empty final response
                continue
            length = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy().reshape(-1)[0]
            yield decoder.step(out.as_numpy().reshape(-1)[: int(length)].tolist())

    def _consume(self, response, decoder, pieces):
        for piece in self._iterate([response], decoder, _NeverCancelled()):
            pieces.append(piece)

    @staticmethod
    def _text(pieces):
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("text_output", np.array(["".join(pieces).encode("utf-8")], dtype=np.object_))
            ]
        )

    def _llm_inputs(self, request):
        ids, max_tokens = tc.prompt(
            request, self.tok, self.max_seq_len, messages="messages", text_input="text_input", max_tokens="max_tokens"
        )
        streaming = bool(tc.first(request, "stream", False))
        end_id = tc.first(request, "end_id")
        pad_id = tc.first(request, "pad_id")
        inputs = [
            tc.tensor("input_ids", [ids], np.int32),
            tc.tensor("input_lengths", [[len(ids)]], np.int32),
            tc.tensor("request_output_len", [[max_tokens]], np.int32),
            tc.tensor("end_id", [[self.tok.end_id if end_id is None else int(end_id)]], np.int32),
            tc.tensor("pad_id", [[self.tok.pad_id if pad_id is None else int(pad_id)]], np.int32),
            tc.tensor("streaming", [[streaming]], np.bool_),
            tc.tensor("exclude_input_in_output", [[True]], np.bool_),
        ]
        for src, dst, dtype in (
            ("temperature", "temperature", np.float32),
            ("top_k", "runtime_top_k", np.int32),
            ("top_p", "runtime_top_p", np.float32),
            ("seed", "seed", np.uint64),
            ("beam_width", "beam_width", np.int32),
        ):
            value = tc.first(request, src)
            if value is not None:
                inputs.append(tc.tensor(dst, [[value]], dtype))
        for src, dst in (("stop_words", "stop_words_list"), ("bad_words", "bad_words_list")):
            words = self.tok.words_to_ids(tc.strings(request, src))
            if words:
                inputs.append(tc.tensor(dst, to_word_list_format(words)[None], np.int32))
        return inputs, streaming


class _NeverCancelled:
    @staticmethod
    def is_cancelled():
        return False
