"""preprocessing: text (or a chat request) -> token ids, stop/bad word lists, end/pad ids.

Inputs and outputs follow tensorrtllm_backend's inflight_batcher_llm preprocessing model; MESSAGES (optional,
JSON: a list of OpenAI-style messages or {"messages": [...], "tools": [...]}) is rendered with the model's chat
template instead of QUERY. Every invalid request gets its own error response.
"""

import json

import numpy as np
import triton_common as tc

from nim_build.errors import UserError
from nim_build.serving.tokenizer import to_word_list_format


class TritonPythonModel:
    def initialize(self, args):
        params = tc.parameters(json.loads(args["model_config"]))
        self.tok, meta = tc.load_tokenizer(args, params)
        self.add_special_tokens = tc.is_true(params.get("add_special_tokens"), default=True)
        self.max_seq_len = meta.get("max_seq_len")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except (UserError, ValueError, TypeError) as e:
                responses.append(tc.error(str(e)))
        return responses

    def _one(self, request):
        ids, max_tokens = tc.prompt(
            request,
            self.tok,
            self.max_seq_len,
            messages="MESSAGES",
            text_input="QUERY",
            max_tokens="REQUEST_OUTPUT_LEN",
            add_special_tokens=self.add_special_tokens,
        )
        end_id = tc.first(request, "END_ID")
        pad_id = tc.first(request, "PAD_ID")
        stop = to_word_list_format(self.tok.words_to_ids(tc.strings(request, "STOP_WORDS_DICT")))
        bad = to_word_list_format(self.tok.words_to_ids(tc.strings(request, "BAD_WORDS_DICT")))
        return tc.pb_utils.InferenceResponse(
            output_tensors=[
                tc.tensor("INPUT_ID", [ids], np.int32),
                tc.tensor("REQUEST_INPUT_LEN", [[len(ids)]], np.int32),
                tc.tensor("REQUEST_OUTPUT_LEN", [[max_tokens]], np.int32),
                tc.tensor("STOP_WORDS_IDS", stop[None], np.int32),
                tc.tensor("BAD_WORDS_IDS", bad[None], np.int32),
                tc.tensor("OUT_END_ID", [[self.tok.end_id if end_id is None else int(end_id)]], np.int32),
                tc.tensor("OUT_PAD_ID", [[self.tok.pad_id if pad_id is None else int(pad_id)]], np.int32),
            ]
        )
