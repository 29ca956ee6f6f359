"""nim_build.serving.client request building and `nim_build infer` argument checks (no server)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nim_build.cli.infer import command as infer_command
from nim_build.errors import InferenceError, UserError
from nim_build.serving.client import Client, GenerateRequest, grpc_inputs


def test_fields_map_to_ensemble_inputs():
    req = GenerateRequest(
        prompt="hi",
        max_tokens=5,
        stream=True,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        seed=1,
        stop=["\n\n"],
        bad_words=["x"],
    )
    body = req.fields()
    assert body == {
        "text_input": "hi",
        "max_tokens": 5,
        "exclude_input_in_output": True,  # the completion only, whatever the repository's default
        "stream": True,
        "temperature": 0.5,
        "top_k": 3,
        "top_p": 0.9,
        "seed": 1,
        "stop_words": ["\n\n"],
        "bad_words": ["x"],
    }
    inputs = {i.name(): i for i in grpc_inputs(body)}
    assert inputs["text_input"].datatype() == "BYTES" and inputs["text_input"].shape() == [1, 1]
    assert inputs["max_tokens"].datatype() == "INT32" and inputs["stream"].datatype() == "BOOL"
    assert inputs["seed"].datatype() == "UINT64" and inputs["top_p"].datatype() == "FP32"
    assert inputs["stop_words"].shape() == [1, 1]


def test_messages_with_tools_travel_as_json():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = GenerateRequest(messages=[{"role": "user", "content": "hi"}], tools=tools).fields()
    assert body["text_input"] == ""
    assert json.loads(body["messages"]) == {"messages": [{"role": "user", "content": "hi"}], "tools": tools}


def test_exactly_one_of_prompt_or_messages():
    with pytest.raises(UserError):
        GenerateRequest().fields()
    with pytest.raises(UserError):
        GenerateRequest(prompt="a", messages=[{"role": "user", "content": "b"}]).fields()
    result = CliRunner().invoke(infer_command, ["--max-tokens", "3"])
    assert isinstance(result.exception, UserError)


def test_unreachable_server_is_a_user_error():
    with pytest.raises(InferenceError):
        Client("127.0.0.1:9", "http", timeout_s=2).generate(GenerateRequest(prompt="hi", max_tokens=1))
    with pytest.raises(UserError, match="protocol"):
        Client(protocol="websocket")
