"""Request shapes for structured outputs and tools: ``response_format``, ``tools``, ``tool_choice``.

Pydantic checks shapes and names (a function name is ``[A-Za-z0-9_-]{1,64}``, as OpenAI
rules); schemas themselves are checked when compiled (`serve.grammar.check_schema`, a 400
naming e.g. ``tools[1].function.parameters``). `ToolPlan` is what a chat request asks of the
tools machinery once validated.

Where the job ends: shapes and the plan. Rendering and parsing are `serve.tools`'s, compiling
`serve.grammar`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hub.errors import InvalidInput

MAX_TOOLS = 128
_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: ``schema`` is the JSON Schema the output must match."""

    name: str = Field(pattern=_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``text``, ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def check(self) -> None:
        """``json_schema`` is required with (and only with) that type."""
        if self.type == "json_schema" and self.json_schema is None:
            raise InvalidInput("'response_format.json_schema' is required when type is "
                               "'json_schema'",
                               fix='Send {"type": "json_schema", "json_schema": {"name": ..., '
                                   '"schema": {...}}}.',
                               param="response_format.json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise InvalidInput(f"'response_format.json_schema' is not allowed with type "
                               f"{self.type!r}", fix="Remove it or use type 'json_schema'.",
                               param="response_format.json_schema")


class FunctionDef(_Strict):
    """``tools[i].function``."""

    name: str = Field(pattern=_NAME_PATTERN)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    """``tools[i]``: only function tools exist in the chat API."""

    type: Literal["function"]
    function: FunctionDef


class FunctionCallIn(_Strict):
    """The function of an assistant's ``tool_calls[i]`` in the history."""

    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCallIn(_Strict):
    """An assistant ``tool_calls[i]`` in the history."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCallIn


@dataclass
class ToolPlan:
    """What the tools of one chat request need.

    Attributes:
        tools: The tools as plain dicts (what the chat template receives).
        mode: ``none`` (rendered, not parsed), ``auto`` (parsed out of the text), ``required``
            or ``named`` (output constrained to valid calls).
        named: The function forced by a named ``tool_choice``.
        parallel: ``parallel_tool_calls`` (default true).
    """

    tools: list[dict[str, Any]]
    mode: Literal["none", "auto", "required", "named"]
    named: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        """Whether the output is constrained to tool calls."""
        return self.mode in ("required", "named")

    def tool(self, name: str) -> dict[str, Any]:
        """The tool called ``name``."""
        return next(t for t in self.tools if t["function"]["name"] == name)


def tool_plan(tools: list[Tool] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """Check ``tools`` and ``tool_choice`` together; None when the request uses no tools.

    Raises:
        InvalidInput: Duplicate names, a ``tool_choice`` without tools, an unknown named
            function, or a malformed ``tool_choice``.
    """
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidInput("'tool_choice' is only allowed when 'tools' are specified",
                               fix="Send 'tools' or drop 'tool_choice'.", param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise InvalidInput(f"At most {MAX_TOOLS} tools are accepted, got {len(tools)}",
                           fix="Send fewer tools.", param="tools")
    names = [t.function.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInput(f"Tool names must be unique; repeated: {dupes[:5]}",
                           fix="Rename the functions.", param="tools")
    plain = [t.model_dump(by_alias=True, exclude_none=True) for t in tools]
    plan = ToolPlan(plain, "auto", parallel=parallel is not False)
    if tool_choice is None or tool_choice == "auto":
        return plan
    if tool_choice in ("none", "required"):
        plan.mode = tool_choice
        return plan
    if (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
            and set(tool_choice) == {"type", "function"}
            and isinstance(tool_choice["function"], dict)
            and set(tool_choice["function"]) == {"name"}):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise InvalidInput(f"tool_choice names function {str(name)[:64]!r}, which is not in "
                               "'tools'", fix=f"Choose one of: {', '.join(names[:10])}.",
                               param="tool_choice")
        plan.mode, plan.named = "named", name
        return plan
    raise InvalidInput("'tool_choice' must be 'none', 'auto', 'required' or "
                       '{"type": "function", "function": {"name": ...}}',
                       fix="Correct 'tool_choice'.", param="tool_choice")


def check_logit_bias(value: Any) -> dict[int, float]:
    """``{"token id": bias}`` with integer keys and biases in [-100, 100].

    Raises:
        ValueError: For pydantic (becomes a 400 naming ``logit_bias``).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected an object mapping token ids to biases")
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not isinstance(key, str) or not key.strip().lstrip("-").isdigit():
            raise ValueError(f"key {str(key)[:20]!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise ValueError(f"bias for {key} must be a number in [-100, 100]")
        out[int(key)] = float(bias)
    return out


class LogitBiasMixin(_Strict):
    """``logit_bias`` parsed to ``{int: float}``."""

    logit_bias: Any = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> dict[int, float]:
        return check_logit_bias(value)
