"""Checks an engine makes on every `GenerationRequest` before queueing it.

The HTTP layer checks context length and parameters before calling the engine; the engine
checks again because it is also used in-process (benchmarks, tests) and must never index its
embedding with a bad id or overrun its KV cache.

Where the job ends: validation only; nothing is queued or loaded here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub.errors import ContextLengthExceeded, Incompatible, InvalidInput
from serve.runtime.adapter_files import check_capabilities
from serve.runtime.sampling import check_params

if TYPE_CHECKING:
    from serve.engine import GenerationRequest


def validate_request(
    request: GenerationRequest, *, base_name: str, vocab_size: int, max_len: int, max_rank: int
) -> None:
    """Refuse requests the engine cannot run.

    Args:
        request: The request.
        base_name: The engine's base (the adapter must be registered against it).
        vocab_size: Token ids must be below it.
        max_len: Prompt must be shorter than it (at least one token is generated).
        max_rank: Largest LoRA rank the engine accepts.

    Raises:
        InvalidInput: Empty prompt, ids out of range, or bad sampling parameters.
        ContextLengthExceeded: Prompt of ``max_len`` tokens or more.
        Incompatible: Adapter registered against another base.
        Unsupported: Adapter features the engine cannot serve.
    """
    ids = request.prompt_ids
    if not isinstance(ids, list) or not ids:
        raise InvalidInput("The prompt is empty", fix="Send at least one token.",
                           param="prompt")
    if len(ids) >= max_len:
        raise ContextLengthExceeded(
            f"The prompt has {len(ids)} tokens; this model's context is {max_len} tokens and "
            "at least one must be left for the completion",
            fix="Shorten the prompt.",
            param="messages",
        )
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidInput(f"Prompt token ids {bad[:5]} are outside the vocabulary "
                           f"(0..{vocab_size - 1})", fix="Tokenise with the base's tokenizer.",
                           param="prompt")
    check_params(request.params, vocab_size)
    adapter = request.adapter
    if adapter is not None:
        if adapter.base != base_name:
            raise Incompatible(
                f"Adapter {adapter.name}@{adapter.version} belongs to base {adapter.base!r}; "
                f"this engine serves {base_name!r}",
                fix=f"Call it on a server for base {adapter.base!r}.",
                param="model",
            )
        check_capabilities(adapter, max_rank)
