"""``POST /v1/completions``: prompts continued as plain text (legacy OpenAI API).

No chat template here: a prompt string is tokenised as given (with the tokenizer's usual special
tokens), a token array is used as is, and a list of either is a batch: every prompt times ``n``
choices is submitted at once (choice ``index`` = prompt index * n + i, as OpenAI numbers them)
to the same generation loop as chat. ``logprobs`` is the legacy integer (number
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
from serve.http.envelope import Envelope, fan_out_seed, sampling_params
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
    prompts = body.prompts()
    vocab = state.fmt.grammars.vocab_size
    want_logprobs = body.logprobs is not None
    n = body.n or 1
    request_id = f"cmpl-{uuid.uuid4().hex}"
    gens = []
    for p_index, prompt in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{p_index}]"
        if isinstance(prompt, str):
            prompt_ids = await state.tokenize(state.fmt.encode_text, prompt)
        else:
            prompt_ids = list(prompt)
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidInput(f"Token ids {bad[:5]} in '{where}' are outside the vocabulary "
                                   f"(0..{vocab - 1})", fix="Tokenise with this model's "
                                   "tokenizer.", param=where)
        if not prompt_ids:
            raise InvalidInput(f"The prompt '{where}' is empty", fix="Send a non-empty prompt.",
                               param=where)
        max_tokens = plan_max_tokens(len(prompt_ids), body.max_tokens, state.max_model_len,
                                     "max_tokens")
        params = sampling_params(body, state, max_tokens, logprobs=want_logprobs,
                                 top_logprobs=body.logprobs or 0)
        for i in range(n):
            index = p_index * n + i
            gens.append(Generation(state, resolved, prompt_ids, fan_out_seed(params, i),
                                   body.stops(),
                                   request_id if index == 0 else f"{request_id}-{index}",
                                   arrived, counts_prompt=i == 0))
    env = Envelope(gens, state, "text_completion",
                   bool(body.stream_options and body.stream_options.include_usage))

    def events(index: int, piece: Piece) -> list[dict[str, Any]]:
        if not (piece.text or piece.tokens or piece.finish_reason):
            return []
        logprobs = legacy_logprobs(state, piece.tokens) if want_logprobs else None
        return [env.chunk([{"index": index, "text": piece.text, "logprobs": logprobs,
                            "finish_reason": piece.finish_reason}])]

    def whole(pieces: list[Piece]) -> dict[str, Any]:
        choices = [CompletionChoice(index=index, text=piece.text,
                                    logprobs=(CompletionLogprobs(**legacy_logprobs(
                                        state, piece.tokens)) if want_logprobs else None),
                                    finish_reason=piece.finish_reason)
                   for index, piece in enumerate(pieces)]
        return Completion(**env.whole(), choices=choices,
                          usage=Usage(**env.usage())).model_dump(mode="json")

    return await respond(request, gens, stream=bool(body.stream), head=list, events=events,
                         tail=env.tail, whole=whole, principal=principal)
