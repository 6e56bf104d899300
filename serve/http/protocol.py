"""The OpenAI wire format: request and response models for chat, completions, models and errors.

Requests are validated strictly (no type coercion, unknown fields refused): a client that sends
``"temperature": "0.5"`` or a field we do not implement gets a 400 naming the field rather than a
silently different answer. `check_fields` runs first, on the raw JSON object, so that fields we
know but do not support (``tools``, ``logit_bias``...) and fields nobody knows get their own clear
messages; pydantic then checks types and ranges.

Where the job ends: shapes and per-field rules only. Whether the model exists, whether the prompt
fits the context and what the engine does are decided in `serve.http.generation`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hub.errors import InvalidInput

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# Fields of the OpenAI API that this server does not implement: refused, never ignored. A field
# sent as null counts as absent.
UNSUPPORTED_FIELDS = frozenset({
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias",
    "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "metadata",
    "service_tier", "suffix", "verbosity", "safety_identifier", "prompt_cache_key",
})
# Fields accepted only at their default value (the only behaviour implemented).
DEFAULT_ONLY_FIELDS: dict[str, Any] = {
    "n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "echo": False,
    "store": False,
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ChatMessage(_Strict):
    """One chat message; ``developer`` is treated as ``system``.

    ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined by
    newlines); other part types (images, audio) are refused.
    """

    role: Literal["system", "developer", "user", "assistant"]
    content: Any

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("expected a string or a non-empty list of text parts")
        texts = []
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if isinstance(part, dict) and kind != "text":
                    raise ValueError(f"content parts of type {_short(kind)!r} are not supported; "
                                     "only 'text'")
                raise ValueError("each content part must be {'type': 'text', 'text': '...'}")
            if part.get("type") != "text" or set(part) - {"type", "text"}:
                raise ValueError("each content part must be {'type': 'text', 'text': '...'}")
            texts.append(part["text"])
        return "\n".join(texts)

    def text(self) -> str:
        """The content as one string."""
        return self.content

    def as_template_input(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict chat templates expect."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class ResponseFormat(_Strict):
    """``{"type": "text"}`` or ``{"type": "json_object"}``."""

    type: Literal["text", "json_object"]


class StreamOptions(_Strict):
    """Streaming options: a final chunk with token usage when asked."""

    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: Any = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("expected a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must have 1-{MAX_STOP_CHARS} characters")
        return stops

    def stops(self) -> list[str]:
        """The stop strings (always a list after validation)."""
        return list(self.stop or [])

    def check_stream_options(self) -> None:
        """``stream_options`` only makes sense with ``stream: true`` (as OpenAI rules)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidInput(
                "'stream_options' is only allowed when 'stream' is true",
                fix="Remove 'stream_options' or set 'stream': true.",
                param="stream_options",
            )


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    store: bool | None = None  # only false (nothing is stored); see DEFAULT_ONLY_FIELDS

    def wanted_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the new name) or ``max_tokens``; both must then agree."""
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise InvalidInput(
                f"'max_tokens' ({self.max_tokens}) and 'max_completion_tokens' "
                f"({self.max_completion_tokens}) disagree",
                fix="Send only 'max_completion_tokens'.",
                param="max_completion_tokens",
            )
        return self.max_completion_tokens or self.max_tokens

    def check(self) -> None:
        """Rules that span fields."""
        self.check_stream_options()
        if self.top_logprobs and not self.logprobs:
            raise InvalidInput(
                "'top_logprobs' needs 'logprobs': true",
                fix="Set 'logprobs': true or drop 'top_logprobs'.",
                param="top_logprobs",
            )
        if self.response_format and self.response_format.type == "json_object":
            if not any("json" in m.text().lower() for m in self.messages):
                raise InvalidInput(
                    "'messages' must contain the word 'json' in some form to use "
                    "'response_format' of type 'json_object'",
                    fix="Ask for JSON in the system or user message.",
                    param="response_format",
                )
        self.wanted_max_tokens()


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (one prompt string)."""

    prompt: Any
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("expected one prompt string (token arrays and batches are not served)")
        return value

    def check(self) -> None:
        """Rules that span fields."""
        self.check_stream_options()


def check_fields(data: Any, model: type[_SamplingFields]) -> dict[str, Any]:
    """Refuse a body that is not an object, unsupported fields and unknown fields, by name.

    Returns:
        The body without unsupported fields sent as null (they mean "absent").

    Raises:
        InvalidInput: Naming the first offending field in ``param``.
    """
    if not isinstance(data, dict):
        raise InvalidInput(
            f"The request body must be a JSON object, got {type(data).__name__}",
            fix="Send a JSON object such as {\"model\": ..., ...}.",
        )
    for key, value in data.items():
        if value is None:
            continue
        if key in UNSUPPORTED_FIELDS:
            raise InvalidInput(
                f"'{key}' is not supported by this server",
                fix=f"Remove '{key}' from the request.",
                param=key,
            )
        if key in DEFAULT_ONLY_FIELDS and value != DEFAULT_ONLY_FIELDS[key]:
            raise InvalidInput(
                f"'{key}'={_short(value)} is not supported; only {DEFAULT_ONLY_FIELDS[key]!r} is",
                fix=f"Remove '{key}' or set it to {DEFAULT_ONLY_FIELDS[key]!r}.",
                param=key,
            )
    data = {k: v for k, v in data.items() if not (v is None and k in UNSUPPORTED_FIELDS)}
    unknown = [k for k in data if k not in model.model_fields]
    if unknown:
        names = ", ".join(repr(_short(k, 40)) for k in unknown[:5])
        raise InvalidInput(
            f"Unrecognized request argument(s) supplied: {names}",
            fix="Remove them; see the OpenAI API reference for the fields of this endpoint.",
            param=_short(unknown[0], 40),
        )
    return data


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -- responses ------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """The body of an error envelope."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``: every error this server returns."""

    error: ErrorDetail


class TopLogprob(BaseModel):
    """One alternative token."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """One generated token with its alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """Chat ``logprobs``: one entry per generated token."""

    content: list[TokenLogprob] | None = None
    refusal: None = None


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: None = None


class ChatChoice(BaseModel):
    """One non-streamed choice. ``json_valid`` appears only with a json_object response_format."""

    model_config = ConfigDict(extra="allow")

    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """A non-streamed chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    """What a stream chunk adds."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """One streamed choice."""

    model_config = ConfigDict(extra="allow")

    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions ``logprobs``."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One text completion choice (also used for stream chunks)."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion, or one chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of ``/v1/models``: the base or an adapter (``BASE+NAME``)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loradock"
    root: str
    parent: str | None = None
    version: int | None = None
    versions: list[int] | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
