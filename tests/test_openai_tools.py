"""Function calling through the OpenAI API: Mistral's format with the real Tekken tokenizer (Mistral NeMo's,
mistral-common's tekken_240718.json) and Llama 3.1's JSON format.

End to end: a real Triton server and `nim_build serve`'s OpenAI API, called with the real `openai` client, on a
scripted engine (nim_build.testing.trivial_engine:ScriptedEngine) that generates the token ids each test gives and
records the prompt it got. Prompts are compared with mistral-common's own rendering of the same request.
"""

from __future__ import annotations

import json
import re

import pytest

openai = pytest.importorskip("openai")

from nim_build.openai.tools import ToolCallParser, tool_style  # noqa: E402
from nim_build.serving.tokenizer import Tokenizer  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a time zone",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time in CET?"}]
TWO_CALLS = (
    ' [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"tz": "CET"}}]'
)
CALL_ID = re.compile(r"^[A-Za-z0-9]{9}$")


@pytest.fixture(scope="module")
def tekken(tekken_dir) -> Tokenizer:
    return Tokenizer.from_dir(tekken_dir)


@pytest.fixture(scope="module")
def scripted(tekken_dir, tmp_path_factory):
    """A served repository on the scripted engine with the Tekken tokenizer; yields (served, engine_dir)."""
    from conftest import ServedRepo, tokenizer_engine_dir

    from nim_build.serving.repo import RepoOptions, generate_repo
    from nim_build.testing.trivial_engine import ScriptedEngine

    root = tmp_path_factory.mktemp("tools")
    engine = tokenizer_engine_dir(root, tekken_dir)
    (engine / ScriptedEngine.SCRIPT).write_text("[]")
    repo = generate_repo(
        engine, root / "repo", RepoOptions(engine_class="nim_build.testing.trivial_engine:ScriptedEngine")
    )
    # health requests only at start: the engine's record of the last prompt stays the test's
    served = ServedRepo(repo, engine, root / "serve.log", args=("--health-interval", "600", "--exit-timeout", "5"))
    try:
        served.wait_ready()
        yield served, engine
    finally:
        code = served.stop()
    # SIGTERM: the API stops, then Triton, and serve exits 0 (conftest checks that no process is left)
    assert code == 0 and served.output().strip().endswith("stopped (Triton exit code 0)"), served.output()[-2000:]


@pytest.fixture
def chat(scripted, tekken):
    """chat(script_text_or_ids, **request) -> (the openai response, the prompt ids the engine got)."""
    served, engine = scripted
    client = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    def ask(script, **kw):
        (engine / "script.json").write_text(json.dumps(script))
        kw.setdefault("messages", ASK)
        r = client.chat.completions.create(model=model, **kw)
        if kw.get("stream"):
            r = list(r)
        return r, json.loads((engine / "last_prompt.json").read_text())

    return ask


def _calls_script(tok: Tokenizer, before: str, calls: str) -> list[int]:
    return tok.encode(before, add_special_tokens=False) + [tok.special_id("[TOOL_CALLS]")] + tok.encode(calls, False)


def _streamed(chunks) -> tuple[str, dict[int, dict], list[str]]:
    """Content, tool calls by index (id, name, concatenated arguments) and finish reasons of a chunk stream."""
    content, calls, finishes = "", {}, []
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:
            call = calls.setdefault(t.index, {"id": None, "name": None, "arguments": "", "names": 0})
            if t.id:
                call["id"] = t.id
            if t.function and t.function.name:
                call["name"] = t.function.name
                call["names"] += 1
            call["arguments"] += (t.function.arguments or "") if t.function else ""
        if c.choices[0].finish_reason:
            finishes.append(c.choices[0].finish_reason)
    return content, calls, finishes


def test_calls_after_text_are_parsed_whole_and_streamed(chat, tekken):
    script = _calls_script(tekken, "Let me check. ", TWO_CALLS)
    r, prompt = chat(script, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me check. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert all(CALL_ID.match(c.id) for c in msg.tool_calls) and len({c.id for c in msg.tool_calls}) == 2
    assert r.usage.completion_tokens == len(script)
    # the tools were rendered as Mistral renders them: [AVAILABLE_TOOLS] before the last user turn
    assert tekken.special_id("[AVAILABLE_TOOLS]") in prompt

    chunks, _ = chat(script, tools=TOOLS, stream=True)
    content, calls, finishes = _streamed(chunks)
    assert content == "Let me check. " and finishes == ["tool_calls"]
    assert [calls[k]["name"] for k in sorted(calls)] == ["get_weather", "get_time"]
    assert all(c["names"] == 1 and CALL_ID.match(c["id"]) for c in calls.values())  # name and id once
    assert [calls[k]["arguments"] for k in sorted(calls)] == [c.function.arguments for c in msg.tool_calls]


def test_a_call_alone_and_leading_whitespace(chat, tekken):
    r, _ = chat(_calls_script(tekken, "", '\n  [{"name": "get_time", "arguments": {}}]  '), tools=TOOLS)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.content is None
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == [("get_time", "{}")]


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_json_is_plain_content_with_a_normal_finish(chat, tekken, stream):
    broken = ' [{"name": "get_weather", "arguments": {"city": '
    r, _ = chat(_calls_script(tekken, "", broken), tools=TOOLS, stream=stream)
    if stream:  # the call's name was streamed before the JSON broke off: the text follows as content, finish stop
        content, calls, finishes = _streamed(r)
        assert finishes == ["stop"] and content == broken
        assert [c["name"] for c in calls.values()] == ["get_weather"]
    else:
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == broken and not r.choices[0].message.tool_calls


def test_tool_results_round_trip_as_mistral_common_renders_them(chat, scripted, tekken, tekken_dir):
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    long_id = "call_0123456789abcdefXYZ123456"  # clients' ids are longer than Mistral's 9: cut to the last 9
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": long_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": long_id, "content": '{"celsius": 21}'},
    ]
    r, prompt = chat(tekken.encode("It is 21 degrees.", add_special_tokens=False), messages=history, tools=TOOLS)
    assert r.choices[0].message.content == "It is 21 degrees." and r.choices[0].finish_reason == "stop"
    expected = MistralTokenizer.from_file(str(tekken_dir / "tekken.json")).encode_chat_completion(
        ChatCompletionRequest(
            messages=[
                UserMessage(content=ASK[0]["content"]),
                AssistantMessage(
                    tool_calls=[
                        ToolCall(
                            id=long_id[-9:], function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}')
                        )
                    ]
                ),
                ToolMessage(tool_call_id=long_id[-9:], content='{"celsius": 21}'),
            ],
            tools=[Tool(function=Function(**t["function"])) for t in TOOLS],
        )
    )
    assert prompt == expected.tokens
    assert tekken.special_id("[TOOL_RESULTS]") in prompt


def test_required_and_named_tool_choice_start_the_call_in_the_prompt(chat, tekken):
    tc = tekken.special_id("[TOOL_CALLS]")
    r, prompt = chat(
        tekken.encode('[{"name": "get_time", "arguments": {"tz": "UTC"}}]', False), tools=TOOLS, tool_choice="required"
    )
    assert prompt[-1] == tc
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"

    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        r, prompt = chat(tekken.encode('{"city": "Rome"}}]', False), tools=TOOLS, tool_choice=named, stream=stream)
        forced = tekken.encode('[{"name": "get_weather", "arguments": ', False)
        assert prompt[-len(forced) - 1 :] == [tc, *forced]
        if stream:
            _, calls, finishes = _streamed(r)
            assert finishes == ["tool_calls"]
            assert (calls[0]["name"], calls[0]["arguments"]) == ("get_weather", '{"city": "Rome"}')
        else:
            call = r.choices[0].message.tool_calls[0]
            assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Rome"}')

    # tool_choice none: no tools in the prompt, and the answer is text
    r, prompt = chat(tekken.encode("Just text.", False), tools=TOOLS, tool_choice="none")
    assert tekken.special_id("[AVAILABLE_TOOLS]") not in prompt and r.choices[0].message.content == "Just text."


def test_a_named_tool_that_is_not_offered_is_a_400(chat):
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        chat([], tools=TOOLS, tool_choice={"type": "function", "function": {"name": "launch"}})


# -- the parser alone, every way the ids may arrive ------------------------------------------------------------


def _parse(tok, style, ids, chunk, prefix=None):
    p = ToolCallParser(tok, style, prefix)
    content, deltas = "", []
    for i in range(0, len(ids), chunk):
        c, d = p.feed(ids[i : i + chunk])
        content, deltas = content + c, deltas + d
    c, d, parsed = p.finish()
    args: dict[int, str] = {}
    for delta in deltas + d:
        args[delta.index] = args.get(delta.index, "") + delta.arguments
    return content + c, parsed, args


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_mistral_deltas_concatenate_to_the_whole_calls(tekken, chunk):
    ids = _calls_script(tekken, "Sure: ", TWO_CALLS.replace('"Paris"', '"Paris, \\"Île\\" 🙂"'))
    assert tool_style(tekken) == "mistral"
    content, parsed, args = _parse(tekken, "mistral", ids, chunk)
    assert content == parsed.content == "Sure: "
    assert [args[k] for k in sorted(args)] == [c.arguments for c in parsed.tool_calls]
    assert json.loads(parsed.tool_calls[0].arguments) == {"city": 'Paris, "Île" 🙂'}


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_llama31_json_calls(default_model_dir, chunk):
    tok = Tokenizer.from_dir(default_model_dir)  # a vocabulary without [TOOL_CALLS]: Llama 3.1's JSON format
    assert tool_style(tok) == "json"
    one = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    two = one + '; {"name": "get_time", "parameters": {"tz": "CET"}}'
    for text, names in ((" " + one, ["get_weather"]), (two, ["get_weather", "get_time"])):
        content, parsed, args = _parse(tok, "json", tok.encode(text, add_special_tokens=False), chunk)
        assert [c.name for c in parsed.tool_calls] == names and not content
        assert [args[k] for k in sorted(args)] == [c.arguments for c in parsed.tool_calls]
        assert json.loads(parsed.tool_calls[0].arguments) == {"city": "Paris"}
    # an answer in words is content; a broken call is content too
    for text in ("Paris is sunny today.", '{"name": "get_weather", "parameters": {"city"'):
        content, parsed, _ = _parse(tok, "json", tok.encode(text, add_special_tokens=False), chunk)
        assert content == text and not parsed.tool_calls


def test_a_history_with_client_call_ids_renders_without_tools_too(chat, tekken):
    """Earlier calls' ids are cut to Mistral's 9 characters whether or not this request offers tools (mistral-common
    refuses longer ones)."""
    long_id = "call_0123456789abcdefXYZ123456"
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": long_id, "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": long_id, "content": "12:00"},
    ]
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r, prompt = chat(tekken.encode("Noon.", add_special_tokens=False), messages=history, **extra)
        assert r.choices[0].message.content == "Noon."
        assert tekken.special_id("[TOOL_RESULTS]") in prompt
