"""What chat and text completions share around the generated text.

Both routes turn a request body into the same `serve.engine.SamplingParams`, report the same
``usage`` block, and wrap every SSE event in the same envelope (``id``, ``object``, ``created``,
``model``, ``system_fingerprint``, ``choices`` and, with ``stream_options.include_usage``, a
``usage`` that is null until the final usage-only chunk, as OpenAI's API does).

Where the job ends: the envelope. The choices inside it (chat ``delta``/``message`` or legacy
``text``) are built by `serve.http.chat` and `serve.http.completions`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from serve.engine import SamplingParams
from serve.http.generation import Generation
from serve.http.state import AppState


def sampling_params(
    body: Any, state: AppState, max_tokens: int, *, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    """Sampling settings from a chat or completions body (OpenAI's defaults for absent fields).

    Args:
        body: The validated request (``temperature``, ``top_p``, ``seed``).
        state: The app state (the chat format's stop token ids).
        max_tokens: The planned completion limit (`serve.http.generation.plan_max_tokens`).
        logprobs: Whether to return token logprobs.
        top_logprobs: Alternatives per token.
    """
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop_token_ids=list(state.fmt.stop_token_ids),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


@dataclass
class Envelope:
    """The per-response fields every chunk and the final object carry.

    Attributes:
        gen: The generation (request id, model, token counts).
        state: The app state (system fingerprint).
        chunk_object: ``object`` of stream chunks (``chat.completion.chunk``, ``text_completion``).
        include_usage: ``stream_options.include_usage`` was set.
        created: Unix time of the response.
    """

    gen: Generation
    state: AppState
    chunk_object: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict[str, int]:
        """The ``usage`` block so far."""
        gen = self.gen
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens}

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
