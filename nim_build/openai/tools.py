"""Function calling: tool calls parsed from generated token ids, whole or as streamed deltas, one parser for both.

Two formats, chosen by the tokenizer:

- **Mistral** (Tekken and SentencePiece v3 vocabularies, which have a `[TOOL_CALLS]` token): the model writes
  `[TOOL_CALLS]` then a JSON array `[{"name": ..., "arguments": {...}}, ...]`. The token is found by its id, never
  by searching decoded text (decoding skips special tokens); text before it is the message's content, and
  whitespace around the JSON is tolerated.
- **JSON** (Llama 3.1 and other templates that ask for a JSON object): the whole answer is
  `{"name": ..., "parameters": {...}}` (or `"arguments"`), several separated by `;`, or whatever follows the
  `<|python_tag|>` token. An answer whose first non-space character is not `{` is content.

Streamed deltas carry each call's id and name once, then its arguments as they arrive: the raw JSON text of the
arguments value, so the concatenated deltas equal the non-streamed `arguments` exactly. An answer that is not a
valid call list is returned as plain content with a normal finish, never an error.

`tool_choice` `required` or a named function is enforced by ending the prompt with the start of a call
(`forced_prefix`): the model cannot but complete it; the parser starts as if it had generated that prefix.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from nim_build.serving.tokenizer import Tokenizer

TOOL_CALL_ID_LENGTH = 9  # mistral-common's tool call ids: 9 letters and digits
_ID_CHARS = string.ascii_letters + string.digits
MISTRAL_TOOL_CALLS = "[TOOL_CALLS]"
LLAMA_PYTHON_TAG = "<|python_tag|>"
_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def new_tool_call_id() -> str:
    return "".join(secrets.choice(_ID_CHARS) for _ in range(TOOL_CALL_ID_LENGTH))


def mistral_tool_call_id(client_id: str) -> str:
    """A client's tool call id as Mistral's format takes it: longer ids are cut to their last 9 characters."""
    return client_id[-TOOL_CALL_ID_LENGTH:] if len(client_id) > TOOL_CALL_ID_LENGTH else client_id


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ToolDelta:
    index: int
    id: str | None = None  # with the name, in the call's first delta
    name: str | None = None
    arguments: str = ""


@dataclass
class Parsed:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


class ToolCallParser:
    """One choice's generated ids -> content and tool calls. `feed` returns what is new (content text, tool deltas);
    `finish` returns the rest and the whole result."""

    def __init__(self, tok: Tokenizer, style: str | None, forced_prefix: str | None = None):
        self.tok, self.style = tok, style
        # the token that starts the calls: Mistral's [TOOL_CALLS], Llama 3.1's <|python_tag|> (where it has one)
        self.tool_calls_id = (
            tok.special_id(MISTRAL_TOOL_CALLS if style == "mistral" else LLAMA_PYTHON_TAG) if style else None
        )
        self._content_decoder = tok.stream_decoder()
        self._tool_decoder = tok.stream_decoder()
        self.content = ""
        self.tool_text = forced_prefix or ""
        # forced: a call from the first token; mistral: content until [TOOL_CALLS]; json: undecided until the
        # first non-space character; None (no tools): content only
        self.mode = "tools" if forced_prefix is not None else ("undecided" if style == "json" else "content")
        self._pending = ""  # json style: leading text while undecided
        self._sent: list[list] = []  # per call: [id, name sent?, arguments sent]

    # -- streaming ---------------------------------------------------------------------------------------------
    def feed(self, ids: list[int]) -> tuple[str, list[ToolDelta]]:
        content = ""
        tool_ids: list[int] = []
        for i in ids:
            if self.mode == "tools":
                tool_ids.append(i)
            elif i == self.tool_calls_id:
                content += self._pending + self._content_decoder.flush()
                self.mode, self._pending = "tools", ""
            elif self.mode == "content":
                content += self._content_decoder.step([i])
            else:  # undecided
                self._pending += self._content_decoder.step([i])
                head = self._pending.lstrip()
                if head.startswith("{"):
                    self.mode, self.tool_text, self._pending = "tools", head, ""
                elif head:
                    self.mode, content, self._pending = "content", self._pending, ""
        self.content += content
        if tool_ids:
            self.tool_text += self._tool_decoder.step(tool_ids)
        return content, self._tool_deltas(final=False) if self.mode == "tools" else []

    def finish(self) -> tuple[str, list[ToolDelta], Parsed]:
        """The last content text and tool deltas, and the whole result."""
        content = self._pending + (self._content_decoder.flush() if self.mode != "tools" else "")
        self._pending = ""
        if self.mode == "tools":
            self.tool_text += self._tool_decoder.flush()
            calls = self._parse()
            if calls is None:  # not a call list: plain content (the tool text as the model wrote it)
                content += self.tool_text
                self.content += content
                return content, [], Parsed(self.content)
            deltas = self._tool_deltas(final=True, calls=calls)
            return content, deltas, Parsed(self.content, calls)
        self.content += content
        return content, [], Parsed(self.content)

    # -- parsing -----------------------------------------------------------------------------------------------
    def _spans(self) -> list[tuple[str, int, int | None]]:
        """Each call seen so far in the tool text: (name, start of its arguments value, end or None if partial)."""
        spans, pos = [], 0
        while (m := _NAME.search(self.tool_text, pos)) is not None:
            try:
                name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                break
            start = m.end()
            end = _value_end(self.tool_text, start)
            spans.append((name, start, end))
            if end is None:
                break
            pos = end
        return spans

    def _parse(self) -> list[ToolCall] | None:
        text = self.tool_text.strip()
        parts = _split_objects(text) if self.style == "json" else [text]
        try:
            loaded = [json.loads(p) for p in parts]
        except json.JSONDecodeError:
            return None
        items = [x for v in loaded for x in (v if isinstance(v, list) else [v])]
        spans = [s for s in self._spans() if s[2] is not None]  # the calls the deltas streamed, in order
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            args = item.get("arguments", item.get("parameters", {}))
            if isinstance(args, str):
                arguments = args
            elif isinstance(args, dict):
                # the raw text the deltas streamed, when the scanner found this call (name, then arguments: what
                # the models write); else compact JSON, sent whole at the end
                if spans and spans[0][0] == item["name"]:
                    _, start, end = spans.pop(0)
                    arguments = self.tool_text[start:end]
                else:
                    arguments = json.dumps(args, ensure_ascii=False)
            else:
                return None
            calls.append(ToolCall("", item["name"], arguments))  # ids: _tool_deltas, the ones streamed
        return calls or None

    def _tool_deltas(self, final: bool, calls: list[ToolCall] | None = None) -> list[ToolDelta]:
        deltas = []
        if final:
            targets = [(c.name, c.arguments) for c in calls]
        else:
            targets = []
            for name, start, end in self._spans():
                value = self.tool_text[start:end] if end is not None else self.tool_text[start:].rstrip()
                # a string value is streamed whole at the end (its decoded text is the arguments, not its JSON)
                targets.append((name, "" if value.startswith('"') else value))
        for k, (name, arguments) in enumerate(targets):
            if k == len(self._sent):
                self._sent.append([new_tool_call_id(), False, ""])
            call_id, named, sent = self._sent[k]
            delta = ToolDelta(k)
            if not named:
                delta.id, delta.name = call_id, name
                self._sent[k][1] = True
            if arguments.startswith(sent) and len(arguments) > len(sent):
                delta.arguments = arguments[len(sent) :]
                self._sent[k][2] = arguments
            if delta.name is not None or delta.arguments:
                deltas.append(delta)
        if final:
            for k, c in enumerate(calls):
                c.id = self._sent[k][0]
        return deltas


def _value_end(text: str, start: int) -> int | None:
    """End index of the JSON value starting at text[start] (object, array, string or scalar); None if incomplete."""
    if start >= len(text):
        return None
    first = text[start]
    if first not in "{[":
        try:
            _, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return None
        return end if end < len(text) or first == '"' else None  # a number may go on
    depth, in_string, escape = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _split_objects(text: str) -> list[str]:
    """`{...}; {...}` (Llama 3.1's several calls) -> the object texts; anything else between them fails parsing."""
    parts, rest = [], text
    while rest:
        end = _value_end(rest, 0)
        if end is None:
            return [text]  # json.loads reports it
        parts.append(rest[:end])
        rest = rest[end:].lstrip()
        if rest and not rest.startswith(";"):
            return [text]
        rest = rest[1:].lstrip()
    return parts


def tool_style(tok: Tokenizer) -> str:
    """ "mistral" when the vocabulary has [TOOL_CALLS], else "json" (Llama 3.1's format)."""
    return "mistral" if tok.special_id(MISTRAL_TOOL_CALLS) is not None else "json"


def forced_prefix(style: str, function: str | None) -> str:
    """The text of a call's start the prompt ends with, for tool_choice `required` (function None) or a named
    function (after the [TOOL_CALLS] token in Mistral's format)."""
    name = "" if function is None else json.dumps(function)
    if style == "mistral":
        return "" if function is None else f'[{{"name": {name}, "arguments": '
    return '{"name": "' if function is None else f'{{"name": {name}, "parameters": '
