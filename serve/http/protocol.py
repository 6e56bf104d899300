"""The OpenAI wire format: request and response models for chat, completions, models and errors.

Requests are validated strictly (no type coercion, unknown fields refused): a client that sends
``"temperature": "0.5"`` or a field we do not implement gets a 400 naming the field rather than a
silently different answer. `check_fields` runs first, on the raw JSON object, so that fields we
know but do not support (``audio``, ``functions``...) and fields nobody knows get their own clear
messages; pydantic then checks types and ranges. Fields accepted without effect (``metadata``,
``user``, ``prompt_cache_key``, ``safety_identifier``, a message's ``name``) are listed in
docs/api.md.

Where the job ends: shapes and per-field rules only. Whether the model exists, whether the prompt
fits the context and what the engine does are decided in `serve.http.generation`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hub.errors import InvalidInput
from serve.http.structured import LogitBiasMixin, ResponseFormat, Tool, ToolCallIn

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_N = 8  # choices per request (each is one engine sequence)
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_METADATA = 16

# Fields of the OpenAI API that this server does not implement: refused, never ignored. A field
# sent as null counts as absent.
UNSUPPORTED_FIELDS = frozenset({
    "functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
    "reasoning_effort", "service_tier", "suffix", "verbosity",
})
# Fields accepted only at their default value (the only behaviour implemented).
DEFAULT_ONLY_FIELDS: dict[str, Any] = {"best_of": 1, "echo": False, "store": False}
# Keys the openai SDK writes as null when an assistant message is sent back as history.
_NULL_MESSAGE_KEYS = frozenset({"refusal", "audio", "function_call", "annotations"})


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ChatMessage(_Strict):
    """One chat message; ``developer`` is treated as ``system``.

    ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined by
    newlines); other part types (images, audio) are refused. An assistant message may carry
    ``tool_calls`` (then ``content`` may be null); a ``tool`` message needs ``tool_call_id``.
    ``name`` is passed to the chat template, which may ignore it.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = Field(None, min_length=1, max_length=64)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _drop_null_extras(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (k in _NULL_MESSAGE_KEYS and v is None)}
        return data

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
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
        """The content as one string (empty when null)."""
        return self.content or ""

    def check(self, index: int) -> None:
        """Rules between a message's fields (``param`` is ``messages[i].FIELD``).

        Raises:
            InvalidInput: A tool message without ``tool_call_id``, ``tool_calls`` outside an
                assistant message, or null content without tool calls.
        """
        where = f"messages[{index}]"
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidInput(f"'{where}.tool_call_id' is required for role 'tool'",
                               fix="Send the id of the tool call this message answers.",
                               param=f"{where}.tool_call_id")
        if self.role != "tool" and self.tool_call_id is not None:
            raise InvalidInput(f"'{where}.tool_call_id' is only allowed for role 'tool'",
                               fix="Remove it.", param=f"{where}.tool_call_id")
        if self.tool_calls is not None and self.role != "assistant":
            raise InvalidInput(f"'{where}.tool_calls' is only allowed for role 'assistant'",
                               fix="Remove it.", param=f"{where}.tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise InvalidInput(f"'{where}.content' is required (null only for an assistant "
                               "message with tool_calls)", fix="Send the message text.",
                               param=f"{where}.content")

    def as_template_input(self) -> dict[str, Any]:
        """The dict chat templates expect (``role``, ``content``, tool fields when present)."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Strict):
    """Streaming options: a final chunk with token usage when asked."""

    include_usage: bool = False


class _SamplingFields(LogitBiasMixin):
    """Fields shared by chat and text completions.

    ``top_k``, ``min_p`` and ``repetition_penalty`` are vLLM's extras.
    """

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: Any = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = Field(None, max_length=1024)
    safety_identifier: str | None = Field(None, max_length=256)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > MAX_METADATA or any(
                len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError(f"at most {MAX_METADATA} pairs, keys up to 64 and values up to "
                             "512 characters")
        return value

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
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

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
        for index, message in enumerate(self.messages):
            message.check(index)
        if self.response_format is not None:
            self.response_format.check()
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
    """``POST /v1/completions``: a prompt string, a token array, or a list of either (batch)."""

    prompt: Any
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> list[str | list[int]]:
        def is_ids(item: Any) -> bool:
            return isinstance(item, list) and bool(item) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in item)

        if isinstance(value, str) or is_ids(value):
            return [value]
        if isinstance(value, list) and value and all(
                isinstance(p, str) or is_ids(p) for p in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
            return list(value)
        raise ValueError("expected a string, an array of token ids, or a non-empty list of "
                         "either")

    def prompts(self) -> list[str | list[int]]:
        """The prompts (always a list after validation)."""
        return list(self.prompt)

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
    """The generated message (``tool_calls`` only when the model called tools)."""

    model_config = ConfigDict(extra="allow")

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
