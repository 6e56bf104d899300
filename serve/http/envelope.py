"""What chat and text completions share around the generated text.

Both routes turn a request body into the same `serve.engine.SamplingParams`, report the same
``usage`` block, and wrap every SSE event in the same envelope (``id``, ``object``, ``created``,
``model``, ``system_fingerprint``, ``choices`` and, with ``stream_options.include_usage``, a
``usage`` that is null until the final usage-only chunk, as OpenAI's API does).

A response may hold several generations (``n`` choices, several prompts): ``usage`` counts each
prompt once (``Generation.counts_prompt``) and every choice's completion tokens. With ``n > 1``
and a ``seed``, choice ``i`` is sampled with ``seed + i`` (`fan_out_seed`), so each choice is
reproducible and the choices differ.

Where the job ends: the envelope. The choices inside it (chat ``delta``/``message`` or legacy
``text``) are built by `serve.http.chat` and `serve.http.completions`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from hub.errors import InvalidInput
from serve.engine import SamplingParams
from serve.http.generation import Generation
from serve.http.state import AppState


def sampling_params(
    body: Any, state: AppState, max_tokens: int, *, logprobs: bool, top_logprobs: int,
    constraint: Any = None,
) -> SamplingParams:
    """Sampling settings from a chat or completions body (OpenAI's defaults for absent fields).

    Args:
        body: The validated request (``temperature``, ``top_p``, ``seed``, penalties...).
        state: The app state (the chat format's stop token ids, the vocabulary size).
        max_tokens: The planned completion limit (`serve.http.generation.plan_max_tokens`).
        logprobs: Whether to return token logprobs.
        top_logprobs: Alternatives per token.
        constraint: A compiled output constraint (`serve.grammar.Constraint`), or None.

    Raises:
        InvalidInput: A ``logit_bias`` token id outside the vocabulary.
    """
    bias = dict(body.logit_bias or {})
    vocab = state.fmt.grammars.vocab_size
    outside = [t for t in bias if not 0 <= t < vocab]
    if outside:
        raise InvalidInput(f"logit_bias token ids {outside[:5]} are outside the vocabulary "
                           f"(0..{vocab - 1})", fix="Use ids of this model's tokenizer.",
                           param="logit_bias")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop_token_ids=list(state.fmt.stop_token_ids),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=bias,
        constraint=constraint,
    )


def fan_out_seed(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of choice ``index`` of ``n``: ``seed + index`` when seeded."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + index + 2**63) % 2**64 - 2**63)


@dataclass
class Envelope:
    """The per-response fields every chunk and the final object carry.

    Attributes:
        gens: The response's generations (the first gives the id and model).
        state: The app state (system fingerprint).
        chunk_object: ``object`` of stream chunks (``chat.completion.chunk``, ``text_completion``).
        include_usage: ``stream_options.include_usage`` was set.
        created: Unix time of the response.
    """

    gens: list[Generation]
    state: AppState
    chunk_object: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def gen(self) -> Generation:
        """The first generation (its id and model name the response)."""
        return self.gens[0]

    def usage(self) -> dict[str, int]:
        """The ``usage`` block so far (each prompt counted once)."""
        prompt = sum(g.prompt_tokens for g in self.gens if g.counts_prompt)
        completion = sum(g.completion_tokens for g in self.gens)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def chunk(self, choices: list[dict[str, Any]], with_usage: bool = False) -> dict[str, Any]:
        """One SSE event around ``choices``."""
        payload: dict[str, Any] = {
            "id": self.gen.request_id, "object": self.chunk_object, "created": self.created,
            "model": self.gen.model, "system_fingerprint": self.state.system_fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            payload["usage"] = self.usage() if with_usage else None
        return payload

    def tail(self) -> list[dict[str, Any]]:
        """The closing usage-only chunk, when asked for."""
        return [self.chunk([], with_usage=True)] if self.include_usage else []

    def whole(self) -> dict[str, Any]:
        """The fields of a non-streamed response besides ``object``, ``choices`` and ``usage``."""
        return {"id": self.gen.request_id, "created": self.created, "model": self.gen.model,
                "system_fingerprint": self.state.system_fingerprint}
