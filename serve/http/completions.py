"""``POST /v1/completions``: one prompt string continued as plain text (legacy OpenAI API).

No chat template here: the prompt is tokenised as given (with the tokenizer's usual special
tokens) and sent to the same generation loop as chat. ``logprobs`` is the legacy integer (number
of alternatives, 0-5) and comes back as ``tokens``/``token_logprobs``/``top_logprobs``/
``text_offset``.

Where the job ends: the completion-specific request and response shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from hub.errors import InvalidInput
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
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)
from serve.http.state import AppState, app_state, caller, parse_request, read_json

router = APIRouter()


def legacy_logprobs(state: AppState, tokens: list[TokenOut]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for ``tokens``."""
    fmt = state.fmt
    return {
        "tokens": [fmt.token_text(t.token_id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{fmt.token_text(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": [t.start for t in tokens],
    }


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> Response:
    """OpenAI (legacy) text completions."""
    arrived = time.monotonic()
    state = app_state(request)
    state.check_accepting()
    body = parse_request(await read_json(request, state.max_body_bytes), CompletionRequest)
    resolved = await resolve_model(state, principal, body.model)
    prompt_ids = await state.tokenize(state.fmt.encode_text, body.prompt)
    if not prompt_ids:
        raise InvalidInput("The prompt is empty", fix="Send a non-empty 'prompt'.", param="prompt")
    max_tokens = plan_max_tokens(len(prompt_ids), body.max_tokens, state.max_model_len,
                                 "max_tokens")
    want_logprobs = body.logprobs is not None
    params = sampling_params(body, state, max_tokens, logprobs=want_logprobs,
                             top_logprobs=body.logprobs or 0)
    gen = Generation(state, resolved, prompt_ids, params, body.stops(),
                     f"cmpl-{uuid.uuid4().hex}", arrived)
    env = Envelope(gen, state, "text_completion",
                   bool(body.stream_options and body.stream_options.include_usage))

    def events(piece: Piece) -> list[dict[str, Any]]:
        if not (piece.text or piece.tokens or piece.finish_reason):
            return []
        logprobs = legacy_logprobs(state, piece.tokens) if want_logprobs else None
        return [env.chunk([{"index": 0, "text": piece.text, "logprobs": logprobs,
                            "finish_reason": piece.finish_reason}])]

    def whole(piece: Piece) -> dict[str, Any]:
        logprobs = (CompletionLogprobs(**legacy_logprobs(state, piece.tokens))
                    if want_logprobs else None)
        choice = CompletionChoice(text=piece.text, logprobs=logprobs,
                                  finish_reason=piece.finish_reason)
        return Completion(**env.whole(), choices=[choice],
                          usage=Usage(**env.usage())).model_dump(mode="json")

    return await respond(request, gen, stream=bool(body.stream), head=list, events=events,
                         tail=env.tail, whole=whole, principal=principal)
