"""Tool calling: which chat templates support tools, and tool calls read back out of the text.

A request's ``tools`` are rendered by the chat template's own tools support (the HF convention:
the template reads a ``tools`` variable); a template without it gets a 400. What the model writes
is parsed per the format the template teaches, recognised from the template text:

- ``hermes`` (the template mentions ``<tool_call>``; Hermes, Qwen):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call;
- ``mistral`` (``[TOOL_CALLS]``): ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]`` or
  ``[TOOL_CALLS]name[ARGS]{...}``;
- ``json`` (anything else; Llama 3): ``{"name": ..., "parameters": {...}}``, ``;``-separated
  for several.

``tool_choice: "required"`` and a named function are not left to the model's format: as vLLM
does, the output is constrained (`serve.grammar`) to JSON that can only be valid calls — for a
named function its ``parameters`` schema (the text *is* the arguments), for ``required`` an array
of ``{"name", "arguments"}`` objects, one ``anyOf`` branch per tool, at most as many items as
tools (one when ``parallel_tool_calls`` is false).

Where the job ends: strings and schemas. Request shapes are `serve.http.structured`'s, SSE
deltas `serve.http.chat`'s.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

ToolFormat = Literal["hermes", "mistral", "json"]
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MISTRAL_MARK = "[TOOL_CALLS]"
_MARKERS: dict[str, str] = {"hermes": "<tool_call>", "mistral": _MISTRAL_MARK}


@dataclass
class ToolCall:
    """One parsed call: ``arguments`` is a JSON string, as OpenAI returns it."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = new_call_id()

    def as_openai(self) -> dict[str, Any]:
        """The ``message.tool_calls[i]`` object."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    """A fresh ``call_...`` id."""
    return "call_" + uuid.uuid4().hex[:24]


def template_supports_tools(template: str) -> bool:
    """Whether a chat template reads the ``tools`` variable (HF's tools convention)."""
    import jinja2
    import jinja2.meta

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        names = jinja2.meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:  # extension tags (``{% generation %}``) and the like
        return re.search(r"\btools\b", template) is not None
    return "tools" in names


def template_format(template: str) -> ToolFormat:
    """The tool-call format a chat template teaches (see the module table)."""
    if "<tool_call>" in template:
        return "hermes"
    if _MISTRAL_MARK in template:
        return "mistral"
    return "json"


def may_start_call(text: str, fmt: ToolFormat) -> int:
    """Index in ``text`` from which a tool call may be starting (``len(text)``: none yet).

    Streaming sends text before this index as content and holds the rest back.
    """
    if fmt == "json":
        stripped = text.lstrip()
        if not stripped:  # only whitespace so far: a call may still follow
            return 0
        return len(text) - len(stripped) if stripped.startswith(("{", "[")) else len(text)
    marker = _MARKERS[fmt]
    found = text.find(marker)
    if found >= 0:
        return found
    if fmt == "mistral" and text.lstrip().startswith("["):  # the marker may be a hidden token
        return len(text) - len(text.lstrip())
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return len(text) - size
    return len(text)


def parse_calls(text: str, fmt: ToolFormat) -> tuple[str | None, list[ToolCall]]:
    """Split generated text into content and tool calls (none if it holds no valid call).

    Returns:
        ``(content, calls)``: the text before the first call (None when empty) and the calls;
        ``(text, [])`` when the text is not a well-formed call of ``fmt``.
    """
    try:
        if fmt == "hermes":
            start = text.find("<tool_call>")
            if start < 0:
                return text, []
            calls = [_call(json.loads(body)) for body in _HERMES.findall(text[start:])]
            head = text[:start].strip()
        elif fmt == "mistral":
            start = text.find(_MISTRAL_MARK)
            body = text[start + len(_MISTRAL_MARK):] if start >= 0 else text
            head = text[:start].strip() if start >= 0 else ""
            calls = _mistral(body.strip())
        else:
            head, calls = "", _json_calls(text.strip().removeprefix("<|python_tag|>").strip())
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    if not calls:
        return text, []
    return (head or None), calls


def _call(obj: Any) -> ToolCall:
    name = obj["name"]
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a name")
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("tool call arguments must be an object")
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _mistral(body: str) -> list[ToolCall]:
    if body.startswith("["):
        value = json.loads(body)
        return [_call(item) for item in (value if isinstance(value, list) else [value])]
    calls = []
    for part in filter(None, (p.strip() for p in body.split(_MISTRAL_MARK))):
        name, sep, args = part.partition("[ARGS]")
        if not sep:
            brace = part.find("{")
            name, args = part[:brace], part[brace:]
        calls.append(_call({"name": name.strip(), "arguments": json.loads(args)}))
    return calls


def _json_calls(body: str) -> list[ToolCall]:
    if not body.startswith(("{", "[")):
        return []
    try:
        value = json.loads(body)
        items = value if isinstance(value, list) else [value]
    except ValueError:
        items = [json.loads(p) for p in body.split(";") if p.strip()]
    return [_call(item) for item in items]


# -- forced calls (tool_choice required / named) ----------------------------------------------


def function_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's ``parameters`` schema (an empty object when it has none)."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of ``tool_choice: "required"``: an array of one or more valid calls."""
    branches = [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]}, "arguments": function_schema(t)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in tools]
    # At most one call per tool (a small model otherwise repeats the same call until
    # max_tokens); one call in all when parallel calls are off.
    return {"type": "array", "minItems": 1, "maxItems": len(tools) if parallel else 1,
            "items": branches[0] if len(branches) == 1 else {"anyOf": branches}}


def forced_calls(text: str, named: str | None) -> list[ToolCall]:
    """The calls in constrained output: the arguments of ``named``, or a ``required`` array.

    Returns:
        The calls; empty when the output was cut (``max_tokens``) before the JSON closed.
    """
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if named is not None:
        return [ToolCall(named, json.dumps(value, ensure_ascii=False))] \
            if isinstance(value, dict) else []
    try:
        return [_call(item) for item in value]
    except (ValueError, TypeError, KeyError):
        return []


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool-call ``arguments`` as objects, not strings.

    OpenAI clients send ``arguments`` as a JSON string; HF templates (Qwen, Hermes, Llama 3)
    serialise ``arguments`` themselves with ``tojson``.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = dict(message)
            fixed = []
            for call in calls:
                function = dict(call["function"])
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except (TypeError, ValueError):
                    pass
                fixed.append({**call, "function": function})
            message["tool_calls"] = fixed
        out.append(message)
    return out
