"""OpenAI's request shapes (chat completions, completions, vLLM's tokenize/detokenize) and its error shape.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send fields of newer API versions); known
fields this server cannot honour are refused with a 400 that names them (`UNSUPPORTED`), never ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_N = 16  # choices per request; more also needs that many free sequences in the engine's batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.code = code
        self.type = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def internal_error(e: Exception) -> OpenAIError:
    """A fault of the server, as clients see it: its type, never a traceback or a server path."""
    return OpenAIError(f"internal server error ({type(e).__name__})", status=500)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's: 0 and -1 are off
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    user: str | None = None
    best_of: int | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    functions: Any = None  # the deprecated function-calling fields: refused, tools replace them
    function_call: Any = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # completions: the number of top log probs (OpenAI's limit 5)
    suffix: str | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


ROLES = ("system", "developer", "user", "assistant", "tool")


def unsupported(req: _Request) -> str | None:
    """The known fields of the request this server cannot honour, as a 400 message; None when there are none."""
    if req.best_of not in (None, 1) and req.best_of != req.n:
        return "best_of is not supported; use n"
    fmt = (req.response_format or {}).get("type")
    if fmt not in (None, "text"):
        return f"response_format {fmt!r} is not supported (no constrained decoding); only 'text'"
    if isinstance(req, ChatCompletionRequest) and (req.functions is not None or req.function_call is not None):
        return "functions / function_call are deprecated and not supported; use tools / tool_choice"
    if isinstance(req, CompletionRequest) and req.suffix:
        return "suffix is not supported (no fill-in-the-middle)"
    return None


def parse(cls: type[BaseModel], data: Any) -> BaseModel:
    """Validate a request body; a validation error is a 400 that names the field."""
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        raise OpenAIError(f"{where}: {err['msg']}" if where else err["msg"], param=where) from None


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Roles and content shapes, before the chat template sees them (its errors are less clear)."""
    for k, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise OpenAIError(
                f"messages[{k}].role {role!r} is not one of {', '.join(ROLES)}", param=f"messages.{k}.role"
            )
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise OpenAIError(
                        f"messages[{k}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                        param=f"messages.{k}.content",
                    )
        elif content is not None and not isinstance(content, str):
            raise OpenAIError(
                f"messages[{k}].content must be a string or a list of text parts", param=f"messages.{k}.content"
            )
        elif content is None and not (role == "assistant" and m.get("tool_calls")):
            raise OpenAIError(f"messages[{k}].content is missing", param=f"messages.{k}.content")


def check_tools(tools: list[dict[str, Any]] | None, choice: Any) -> None:
    """tools and tool_choice in OpenAI's shape, with tool_choice naming an offered function."""
    names = []
    for k, t in enumerate(tools or []):
        fn = t.get("function")
        if t.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise OpenAIError(
                f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                param=f"tools.{k}",
            )
        names.append(fn["name"])
    if choice not in (None, "none", "auto") and not tools:
        raise OpenAIError("tool_choice needs tools", param="tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or name not in names:
            raise OpenAIError(
                f"tool_choice names the function {name!r}, which is not among the tools ({', '.join(names)})",
                param="tool_choice",
            )


def flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Text parts joined into one string (every chat template takes strings), developer as system."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            m = {**m, "content": "".join(p["text"] for p in m["content"])}
        if m.get("role") == "developer":  # OpenAI's newer name of the system role
            m = {**m, "role": "system"}
        out.append(m)
    return out
