"""Pieces of the OpenAI API without a server: Triton responses parsed as TensorRT-LLM's backend sends them, the
request -> engine-input mapping checked against the runtime's own reading of TensorRT-LLM's sampling inputs, and
OpenAI's stop-string rule."""

from __future__ import annotations

import numpy as np
import pytest

from nim_build.openai import protocol as P
from nim_build.openai.triton_llm import EngineRequest, _delta
from nim_build.runtime.api import from_trtllm


def _response(ids: list[int], log_probs: list[float] | None, final: bool):
    from tritonclient.grpc import service_pb2

    r = service_pb2.ModelInferResponse(model_name="tensorrt_llm")
    out = r.outputs.add(name="output_ids", datatype="INT32")
    out.shape.extend([1, 1, len(ids)])
    r.raw_output_contents.append(np.asarray(ids, dtype=np.int32).tobytes())
    if log_probs is not None:
        lp = r.outputs.add(name="output_log_probs", datatype="FP32")
        lp.shape.extend([1, 1, len(log_probs)])
        r.raw_output_contents.append(np.asarray(log_probs, dtype=np.float32).tobytes())
    r.parameters["triton_final_response"].bool_param = final
    return r


def test_streamed_log_probs_are_the_new_tokens_whether_the_backend_sends_all_or_new_ones():
    per_step = _delta(_response([5, 6], [-0.5, -0.25], final=False))
    cumulative = _delta(_response([5, 6], [-1.0, -2.0, -0.5, -0.25], final=True))
    assert per_step.token_ids == cumulative.token_ids == [5, 6]
    assert per_step.log_probs == cumulative.log_probs == [-0.5, -0.25]
    assert (per_step.final, cumulative.final) == (False, True)


def _sampling(req: P._Request) -> dict:
    from types import SimpleNamespace

    from nim_build.openai.app import OpenAIServer

    server = OpenAIServer.__new__(OpenAIServer)  # sampling() reads the model only for stops and logit_bias
    server.model = SimpleNamespace(tokenizer=SimpleNamespace(words_to_ids=lambda words: []), extra_end_ids=[])
    return {**server.sampling(req), "seed": server.seeds(req)[0]}


@pytest.mark.parametrize(
    "fields,greedy",
    [({}, False), ({"temperature": 0}, True), ({"temperature": 0.7, "top_p": 0.9}, False), ({"top_k": 1}, True)],
)
def test_openai_sampling_means_the_same_to_the_engine(fields, greedy):
    """What the engine makes of the inputs the API sends (from_trtllm, the runtime's reading of TensorRT-LLM's
    rules): OpenAI's default request samples the whole vocabulary; temperature 0 is greedy."""
    req = P.parse(P.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], **fields})
    p = _sampling(req)
    params = from_trtllm(8, top_k=p["top_k"], top_p=p["top_p"], temperature=p["temperature"], seed=p["seed"])
    assert params.greedy == greedy
    if not fields:
        assert (params.top_k, params.top_p, params.temperature) == (0, 1.0, 1.0)
    assert 0 <= p["seed"] < 2**64  # unseeded: a random seed, not TensorRT-LLM's 0 for everyone


def test_engine_request_tensors_have_the_tensorrt_llm_models_names_and_shapes():
    req = EngineRequest([1, 2, 3], 8, end_id=2, pad_id=2, temperature=1.0, top_p=1.0, top_k=0, seed=7)
    req.stop_words = [[4, 5]]
    tensors = dict(req.tensors())
    assert tensors["input_ids"].shape == (1, 3) and tensors["input_ids"].dtype == np.int32
    assert tensors["stop_words_list"].shape == (1, 2, 2)
    from nim_build.serving.repo import LLM_INPUTS

    declared = {name: dtype.removeprefix("TYPE_") for name, dtype, *_ in LLM_INPUTS}
    names = {np.int32: "INT32", np.uint64: "UINT64", np.float32: "FP32", np.bool_: "BOOL"}
    for name, arr in tensors.items():
        assert declared[name] == names[arr.dtype.type], name


def test_stop_strings_across_pieces():
    from nim_build.openai.app import Choice
    from nim_build.openai.tools import ToolCallParser

    class Pieces:  # a tokenizer whose ids are indexes into a list of text pieces
        def __init__(self, pieces):
            self.pieces = pieces

        def stream_decoder(self):
            pieces = self.pieces

            class D:
                def step(self, ids):
                    return "".join(pieces[i] for i in ids)

                def flush(self):
                    return ""

            return D()

        def special_id(self, _):
            return None

    tok = Pieces(["Hello", " wor", "ld", "!", " END", " more"])
    for stops, expected, reason in (
        (["world"], "Hello ", "stop"),
        (["END", "zz"], "Hello world! ", "stop"),
        (["nothing"], "Hello world! END more", "length"),
    ):
        c = Choice(0, tok, ToolCallParser(tok, None), stops, None)
        sent = "".join(c.feed([i], None)[0] for i in range(6))
        sent += c.finish(max_tokens=6)[0]
        assert sent == c.text == expected
        assert c.finish_reason == reason
