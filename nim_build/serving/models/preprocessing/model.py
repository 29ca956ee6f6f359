"""preprocessing: text (or a chat request) -> token ids, stop/bad word lists, embedding bias, end/pad ids.

Inputs and outputs follow tensorrtllm_backend's inflight_batcher_llm preprocessing model (c2e65b8): a request may
carry B rows; INPUT_ID is [B, longest] right-padded with the pad id (tensorrt_llm trims each row to its
REQUEST_INPUT_LEN), word lists [B, 2, L], EMBEDDING_BIAS [B, vocab] (or [B, 0] without bias words), DECODER_INPUT_ID
[B, 1] of the pad id for a decoder-only model. STREAM_KEY ([B, 1], ours) is a random key per row: in the reference
backend's ensemble, tensorrt_llm lets only that key stop the row's streams. MESSAGES (optional, JSON: a list of
OpenAI-style messages or {"messages": [...], "tools": [...]}) is rendered with the model's chat template instead of
QUERY. Every invalid request gets its own error response.
"""

import json
import secrets

import numpy as np
import triton_common as tc


class TritonPythonModel:
    def initialize(self, args):
        params = tc.parameters(json.loads(args["model_config"]))
        self.tok, meta = tc.load_tokenizer(args, params)
        self.add_special_tokens = tc.is_true(params.get("add_special_tokens"), default=True)
        self.max_seq_len = meta.get("max_seq_len")
        self.vocab_size = meta.get("vocab_size") or self.tok.vocab_size

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:
                responses.append(tc.error(tc.error_message(e, "preprocessing")))
        return responses

    def _one(self, request):
        rows = tc.batch_size(request, "QUERY", "MESSAGES", "REQUEST_OUTPUT_LEN")
        prompts, lengths = [], []
        for b in range(rows):
            ids, max_tokens = tc.prompt(
                request,
                self.tok,
                self.max_seq_len,
                messages="MESSAGES",
                text_input="QUERY",
                max_tokens="REQUEST_OUTPUT_LEN",
                add_special_tokens=self.add_special_tokens,
                b=b,
            )
            prompts.append(ids)
            lengths.append(max_tokens)
        end_ids = [tc.row(request, "END_ID", b, self.tok.end_id) for b in range(rows)]
        pad_ids = [tc.row(request, "PAD_ID", b, self.tok.pad_id) for b in range(rows)]
        bias = tc.embedding_bias(
            self.tok, self.vocab_size, request, rows, "EMBEDDING_BIAS_WORDS", "EMBEDDING_BIAS_WEIGHTS"
        )
        width = max(len(p) for p in prompts)
        input_ids = np.array([p + [pad_ids[b]] * (width - len(p)) for b, p in enumerate(prompts)], dtype=np.int32)
        return tc.pb_utils.InferenceResponse(
            output_tensors=[
                tc.tensor("INPUT_ID", input_ids, np.int32),
                tc.tensor("DECODER_INPUT_ID", [[p] for p in pad_ids], np.int32),
                tc.tensor("REQUEST_INPUT_LEN", [[len(p)] for p in prompts], np.int32),
                tc.tensor("REQUEST_DECODER_INPUT_LEN", [[1]] * rows, np.int32),
                tc.tensor("REQUEST_OUTPUT_LEN", [[n] for n in lengths], np.int32),
                tc.tensor("STOP_WORDS_IDS", tc.word_lists(self.tok, request, "STOP_WORDS_DICT", rows), np.int32),
                tc.tensor("BAD_WORDS_IDS", tc.word_lists(self.tok, request, "BAD_WORDS_DICT", rows), np.int32),
                tc.tensor("EMBEDDING_BIAS", bias, np.float32),
                tc.tensor("OUT_END_ID", [[e] for e in end_ids], np.int32),
                tc.tensor("OUT_PAD_ID", [[p] for p in pad_ids], np.int32),
                tc.tensor("STREAM_KEY", [[secrets.randbits(63)] for _ in range(rows)], np.uint64),
            ]
        )
