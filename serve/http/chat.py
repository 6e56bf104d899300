"""``POST /v1/chat/completions``: messages in, an assistant message out (one body or SSE chunks).

The request is validated (`serve.http.protocol`), ``model`` resolved for this caller, the
messages rendered with the adapter's own chat template and tokenised (`serve.chat`), the budget
checked against the context, then the shared generation loop runs (`serve.http.generation`).
With ``response_format: {"type": "json_object"}`` the finished text is checked and the choice
carries ``json_valid`` (true/false); an invalid one is also counted in ``/metrics``.

Where the job ends: the chat-specific request and response shapes.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serve.http.auth import Principal
from serve.http.envelope import Envelope, sampling_params
from serve.http.generation import (
    Generation,
    Piece,
    TokenOut,
    plan_max_tokens,
    resolve_model,
    respond,
)
from serve.http.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Usage,
)
from serve.http.state import AppState, app_state, caller, parse_request, read_json

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
    messages = [m.as_template_input() for m in body.messages]
    prompt_ids = await state.tokenize(state.fmt.encode_chat, messages, resolved.adapter)
    max_tokens = plan_max_tokens(
        len(prompt_ids), body.wanted_max_tokens(), state.max_model_len, "max_completion_tokens"
    )
    params = sampling_params(body, state, max_tokens, logprobs=bool(body.logprobs),
                             top_logprobs=body.top_logprobs or 0)
    gen = Generation(state, resolved, prompt_ids, params, body.stops(),
                     f"chatcmpl-{uuid.uuid4().hex}", arrived)
    env = Envelope(gen, state, "chat.completion.chunk",
                   bool(body.stream_options and body.stream_options.include_usage))
    want_json = body.response_format is not None and body.response_format.type == "json_object"

    def json_flag() -> dict[str, Any]:
        if not want_json:
            return {}
        valid = _json_valid(gen.text)
        if not valid:
            state.metrics.count_event("json_invalid")
        return {"json_valid": valid}

    def head() -> list[dict[str, Any]]:
        return [env.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}])]

    def events(piece: Piece) -> list[dict[str, Any]]:
        out = []
        if piece.text or piece.tokens:
            logprobs = ({"content": logprob_entries(state, piece.tokens), "refusal": None}
                        if body.logprobs else None)
            out.append(env.chunk([{"index": 0, "delta": {"content": piece.text},
                                   "logprobs": logprobs, "finish_reason": None}]))
        if piece.finish_reason:
            out.append(env.chunk([{"index": 0, "delta": {}, "logprobs": None,
                                   "finish_reason": piece.finish_reason, **json_flag()}]))
        return out

    def whole(piece: Piece) -> dict[str, Any]:
        logprobs = (ChoiceLogprobs(content=logprob_entries(state, piece.tokens))
                    if body.logprobs else None)
        choice = ChatChoice(message=AssistantMessage(content=piece.text), logprobs=logprobs,
                            finish_reason=piece.finish_reason, **json_flag())
        return ChatCompletion(**env.whole(), choices=[choice],
                              usage=Usage(**env.usage())).model_dump(mode="json")

    return await respond(request, gen, stream=bool(body.stream), head=head, events=events,
                         tail=env.tail, whole=whole, principal=principal)
