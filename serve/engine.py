"""The engine interface: what every inference engine (peft, vllm, llamacpp) implements.

An engine turns prompt token ids into generated token ids for one base model and any number of
LoRA adapters. It knows nothing about HTTP, chat templates, tokenisation of messages, stop
strings or detokenisation: the server front (`serve.chat`, `serve.http`) does those once for all
engines and hands the engine token ids. Engines stop on ``stop_token_ids`` and ``max_tokens``
themselves (a stop token ends the stream with ``finish_reason="stop"`` and is never yielded);
the front stops them early (stop strings, client gone) by closing the stream or calling
`Engine.abort`.

Engines are chosen by name from `ENGINES`; the heavy imports (torch, vllm, llama_cpp) happen only
inside the chosen engine's module, when `create_engine` imports it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from hub.bases import BaseInfo
from hub.errors import InvalidInput
from hub.store import AdapterRecord

BaseDtype = Literal["auto", "nf4", "nf4-dense", "fp32", "bf16", "fp16"]
FinishReason = Literal["stop", "length", "abort"]


@dataclass
class EngineConfig:
    """Settings every engine understands (engine-specific extras go in ``options``).

    Attributes:
        base: The base model to load once.
        base_dtype: Weight format of the base: ``nf4`` (bitsandbytes 4-bit), ``nf4-dense``
            (the NF4 values in dense layers), ``fp32``, ``bf16``, ``fp16``, or ``auto`` (the
            engine's choice for the device; see each engine's docstring).
        device: ``cpu``, ``cuda`` or ``auto``.
        max_adapters: Adapters resident at once; the least recently used idle one is evicted.
        max_running: Sequences decoded together in one forward pass (batch slots).
        max_queue: Requests waiting for a slot before new ones get 429.
        max_model_len: Longest prompt + completion in tokens (capped by the base's context).
        max_lora_rank: Largest LoRA rank accepted (engines that need a cap size buffers by it).
        threads: CPU threads for torch (0: engine default).
        options: Engine-specific settings.
    """

    base: BaseInfo
    base_dtype: BaseDtype = "auto"
    device: str = "auto"
    max_adapters: int = 8
    max_running: int = 16
    max_queue: int = 64
    max_model_len: int = 2048
    max_lora_rank: int = 64
    threads: int = 0
    options: dict[str, object] = field(default_factory=dict)


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy.

    The processing order and each rule's definition are in `serve.runtime.sampling`.

    Attributes:
        top_k: Keep the ``top_k`` most likely tokens (0 or -1: off).
        min_p: Drop tokens less likely than ``min_p`` times the most likely one (0: off).
        presence_penalty: Subtracted once from a token's logit if it was generated before.
        frequency_penalty: Subtracted from a token's logit per time it was generated.
        repetition_penalty: Divides positive / multiplies negative logits of tokens seen in the
            prompt or the output (1: off).
        logit_bias: ``{token_id: bias}`` added to the logits.
        constraint: A compiled output constraint (`serve.grammar.Constraint`), or None. Opaque
            to the scheduler: the peft engine's sampler turns it into a token matcher, the
            vllm and llama.cpp engines translate its source schema.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    constraint: Any = None


@dataclass
class GenerationRequest:
    """One sequence to generate.

    Attributes:
        request_id: Unique id (used by `Engine.abort`).
        prompt_ids: Tokenised prompt, chat template already applied.
        adapter: The adapter version to apply, or None for the bare base.
        params: Sampling parameters.
    """

    request_id: str
    prompt_ids: list[int]
    adapter: AdapterRecord | None
    params: SamplingParams


@dataclass
class TokenChunk:
    """Tokens produced since the previous chunk for one request.

    Attributes:
        token_ids: New token ids (usually one).
        logprobs: Log-probability of each new token, when asked for.
        top_logprobs: Per new token, ``{token_id: logprob}`` of the most likely alternatives.
        finish_reason: Set on the last chunk.
        prompt_tokens: Number of prompt tokens (set on the first chunk).
        adapter_load_s: Seconds spent loading the adapter for this request (0 when resident).
    """

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    adapter_load_s: float = 0.0


@dataclass
class EngineHealth:
    """A snapshot for ``/health`` and ``/metrics``."""

    status: Literal["starting", "ok", "draining", "failed"]
    engine: str
    base: str
    resident_adapters: list[str] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    detail: str = ""


@runtime_checkable
class Engine(Protocol):
    """What the server needs from an engine; nothing more.

    Errors: `generate` raises `hub.errors.Overloaded` when the queue is full,
    `hub.errors.Unsupported` for an adapter the engine cannot serve, and
    `hub.errors.EngineUnavailable` while draining.
    """

    name: str

    async def start(self) -> None:
        """Load the base model and start the scheduler."""

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, finish running ones (up to the timeout), free resources."""

    async def load_adapter(self, adapter: AdapterRecord) -> float:
        """Make ``adapter`` resident now; return the seconds it took (0 if already resident)."""

    async def unload_adapter(self, key: str) -> bool:
        """Evict adapter ``NAME@V``; False if it was not resident. Pinned ones raise Conflict."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream the tokens of one request. Closing the iterator aborts the request.

        A sampled token in ``stop_token_ids`` is not yielded: the last chunk carries
        ``finish_reason="stop"`` and no token for it.
        """

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its slot (no-op if it already finished)."""

    def health(self) -> EngineHealth:
        """Current state, cheap to call."""


def adapter_key(adapter: AdapterRecord) -> str:
    """``NAME@V``: how every engine names a resident adapter."""
    return f"{adapter.name}@{adapter.version}"


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


ENGINES: dict[str, str] = {
    "peft": "serve.engines.peft:PeftEngine",
    "vllm": "serve.engines.vllm:VllmEngine",
    "llamacpp": "serve.engines.llamacpp:LlamaCppEngine",
    "fake": "serve.engines.fake:FakeEngine",
}


def create_engine(name: str, config: EngineConfig) -> Engine:
    """Import and construct the engine registered as ``name``.

    Raises:
        InvalidInput: Unknown engine name.
    """
    target = ENGINES.get(name)
    if target is None:
        raise InvalidInput(
            f"Unknown engine {name!r}",
            fix=f"Choose one of: {', '.join(sorted(k for k in ENGINES if k != 'fake'))}.",
            param="engine",
        )
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)(config)
