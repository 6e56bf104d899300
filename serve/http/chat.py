"""``POST /v1/chat/completions``: messages in, assistant messages out (one body or SSE chunks).

The request is validated (`serve.http.protocol`), ``model`` resolved for this caller, the
messages (and ``tools``, through the template's own tools support) rendered with the adapter's
chat template and tokenised (`serve.chat`), the budget checked against the context, the output
constraint compiled (`serve.grammar`: ``response_format`` json_schema / json_object, or the
calls a ``required`` / named ``tool_choice`` forces), then ``n`` generations run together
(`serve.http.generation`).

Tool calls come back as ``message.tool_calls`` (``finish_reason: "tool_calls"``), parsed per the
template's format (`serve.tools`). Streamed, text that may start a call is held back and each
call is sent whole as one ``tool_calls`` delta once the choice ends, which the openai SDK
reassembles to the same call as the non-streamed answer. With ``response_format: json_object``
the choice also carries ``json_valid`` (an invalid one is counted in ``/metrics``).

Where the job ends: the chat-specific request and response shapes.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from hub.errors import InvalidInput
from serve.grammar import Constraint, check_schema
from serve.http.auth import Principal
from serve.http.envelope import Envelope, fan_out_seed, sampling_params
from serve.http.generation import (
    Generation,
    Piece,
    TokenOut,
    plan_max_tokens,
    resolve_model,
    respond,
)
from serve.http.protocol import ChatCompletionRequest
from serve.http.state import AppState, app_state, caller, parse_request, read_json
from serve.http.structured import ToolPlan, tool_plan
from serve.tools import (
    ToolCall,
    ToolFormat,
    forced_calls,
    function_schema,
    may_start_call,
    parse_calls,
    required_schema,
    template_format,
    template_messages,
    template_supports_tools,
)

router = APIRouter()


def logprob_entries(state: AppState, tokens: list[TokenOut]) -> list[dict[str, Any]]:
    """Chat-style ``logprobs.content`` entries."""
    fmt = state.fmt

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        raw = fmt.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}

    return [
        {**one(t.token_id, t.logprob), "top_logprobs": [one(i, lp) for i, lp in t.top]}
        for t in tokens
    ]


def _json_valid(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def build_constraint(state: AppState, body: ChatCompletionRequest,
                     plan: ToolPlan | None) -> Constraint | None:
    """The output constraint of a request (runs in the tokenizer worker: it compiles).

    Raises:
        InvalidInput: A tool's ``parameters`` or the response schema is refused (``param``
            names it), or a forced tool call is combined with a JSON ``response_format``.
    """
    grammars = state.fmt.grammars
    wants_json = body.response_format is not None and body.response_format.type != "text"
    if plan is not None:
        for i, tool in enumerate(plan.tools):
            if "parameters" in tool["function"]:
                check_schema(tool["function"]["parameters"], f"tools[{i}].function.parameters")
        if plan.forced and wants_json:
            raise InvalidInput("A JSON 'response_format' cannot be combined with a 'required' or "
                               "named 'tool_choice' (the output is the tool call)",
                               fix="Drop 'response_format' or use tool_choice 'auto'.",
                               param="response_format")
        if plan.forced:
            for i, tool in enumerate(plan.tools):  # per-tool errors name the tool
                if plan.named is None or tool["function"]["name"] == plan.named:
                    named = grammars.json_schema(function_schema(tool),
                                                 param=f"tools[{i}].function.parameters")
            if plan.named is not None:
                return named
            return grammars.json_schema(required_schema(plan.tools, plan.parallel),
                                        param="tools")
    if not wants_json:
        return None
    assert body.response_format is not None
    if body.response_format.type == "json_object":
        return grammars.json_object()
    spec = body.response_format.json_schema
    assert spec is not None
    schema = spec.schema_ if spec.schema_ is not None else {"type": "object"}
    return grammars.json_schema(schema, param="response_format.json_schema.schema",
                                strict=bool(spec.strict))


class ChoiceText:
    """One choice's text on its way out: content, and tool calls once it ends.

    Args:
        plan: The request's tools (None: no tools).
        fmt: The template's tool-call format.
        raw: Returns the choice's text with special tokens kept (markers may be special).
    """

    def __init__(self, plan: ToolPlan | None, fmt: ToolFormat, raw: Any) -> None:
        self.mode = plan.mode if plan else "none"
        self.named = plan.named if plan else None
        self.fmt = fmt
        self.raw = raw
        self.text = ""
        self.sent = 0
        self.locked = False

    def push(self, text: str) -> str:
        """Add generated text; return the content that is safe to stream now."""
        self.text += text
        if self.mode == "none":
            self.sent = len(self.text)
            return text
        if self.mode != "auto" or self.locked:
            return ""
        pending = self.text[self.sent:]
        cut = may_start_call(pending, self.fmt)
        if cut < len(pending) and self._call_started(pending[cut:]):
            self.locked = True
        out = pending[:cut].rstrip()  # whitespace before a call is not content
        self.sent += len(out)
        return out

    def _call_started(self, rest: str) -> bool:
        if self.fmt == "json":
            return rest.lstrip()[:1] in ("{", "[")
        if self.fmt == "mistral" and rest.lstrip().startswith("["):
            return True
        marker = "<tool_call>" if self.fmt == "hermes" else "[TOOL_CALLS]"
        return rest.startswith(marker)

    def finish(self) -> tuple[str | None, list[ToolCall]]:
        """``(content, calls)`` of the whole choice."""
        if self.mode == "none":
            return self.text, []
        if self.mode in ("required", "named"):
            calls = forced_calls(self.text, self.named)
            return (None, calls) if calls else (self.text, [])
        source = self.raw() if self.fmt == "mistral" else self.text
        content, calls = parse_calls(source, self.fmt)
        return (content, calls) if calls else (self.text, [])

    def rest(self) -> tuple[str, list[ToolCall]]:
        """The content not streamed yet and the calls, at the end of a streamed choice."""
        content, calls = self.finish()
        if not calls:
            return self.text[self.sent:], []
        head = content or ""
        return (head[self.sent:] if len(head) > self.sent else ""), calls


def _finish_reason(reason: str | None, calls: list[ToolCall]) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> Response:
    """OpenAI chat completions."""
    arrived = time.monotonic()
    state = app_state(request)
    state.check_accepting()
    body = parse_request(await read_json(request, state.max_body_bytes), ChatCompletionRequest)
    resolved = await resolve_model(state, principal, body.model)
    fmt = state.fmt
    plan = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    template = fmt.template_for(resolved.adapter)
    if plan is not None and not template_supports_tools(template):
        raise InvalidInput(
            f"The chat template of {resolved.model!r} has no tools support (it never reads "
            "'tools'), so the model cannot be told about them",
            fix="Drop 'tools', or serve an adapter whose chat_template.jinja renders tools.",
            param="tools",
        )
    tool_fmt: ToolFormat = template_format(template)
    messages = template_messages([m.as_template_input() for m in body.messages])
    prompt_ids = await state.tokenize(fmt.encode_chat, messages, resolved.adapter,
                                      plan.tools if plan else None)
    max_tokens = plan_max_tokens(
        len(prompt_ids), body.wanted_max_tokens(), state.max_model_len, "max_completion_tokens"
    )
    constraint = await state.tokenize(build_constraint, state, body, plan)
    params = sampling_params(body, state, max_tokens, logprobs=bool(body.logprobs),
                             top_logprobs=body.top_logprobs or 0, constraint=constraint)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    gens = [Generation(state, resolved, prompt_ids, fan_out_seed(params, i), body.stops(),
                       request_id if i == 0 else f"{request_id}-{i}", arrived,
                       counts_prompt=i == 0)
            for i in range(body.n or 1)]
    env = Envelope(gens, state, "chat.completion.chunk",
                   bool(body.stream_options and body.stream_options.include_usage))
    want_json = body.response_format is not None and body.response_format.type == "json_object"
    texts = [ChoiceText(plan, tool_fmt, lambda g=g: fmt.decode_raw(g.token_ids)) for g in gens]

    def json_flag(text: str) -> dict[str, Any]:
        if not want_json:
            return {}
        valid = _json_valid(text)
        if not valid:
            state.metrics.count_event("json_invalid")
        return {"json_valid": valid}

    def logprobs_of(tokens: list[TokenOut]) -> dict[str, Any] | None:
        return ({"content": logprob_entries(state, tokens), "refusal": None}
                if body.logprobs else None)

    def head() -> list[dict[str, Any]]:
        return [env.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}]) for i in range(len(gens))]

    def events(index: int, piece: Piece) -> list[dict[str, Any]]:
        out = []
        text = texts[index].push(piece.text) if piece.text else ""
        if text or piece.tokens:
            out.append(env.chunk([{"index": index, "delta": {"content": text},
                                   "logprobs": logprobs_of(piece.tokens),
                                   "finish_reason": None}]))
        if piece.finish_reason:
            rest, calls = texts[index].rest()
            if rest:
                out.append(env.chunk([{"index": index, "delta": {"content": rest},
                                       "logprobs": None, "finish_reason": None}]))
            for k, call in enumerate(calls):
                delta = {"tool_calls": [{"index": k, **call.as_openai()}]}
                out.append(env.chunk([{"index": index, "delta": delta, "logprobs": None,
                                       "finish_reason": None}]))
            out.append(env.chunk([{"index": index, "delta": {}, "logprobs": None,
                                   "finish_reason": _finish_reason(piece.finish_reason, calls),
                                   **json_flag(texts[index].text)}]))
        return out

    def whole(pieces: list[Piece]) -> dict[str, Any]:
        choices = []
        for index, piece in enumerate(pieces):
            texts[index].push(piece.text)
            content, calls = texts[index].finish()
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if calls:
                message["tool_calls"] = [c.as_openai() for c in calls]
            choices.append({"index": index, "message": message,
                            "logprobs": logprobs_of(piece.tokens) if body.logprobs else None,
                            "finish_reason": _finish_reason(piece.finish_reason, calls),
                            **json_flag(piece.text)})
        return {**env.whole(), "object": "chat.completion", "choices": choices,
                "usage": env.usage()}

    return await respond(request, gens, stream=bool(body.stream), head=head, events=events,
                         tail=env.tail, whole=whole, principal=principal)
