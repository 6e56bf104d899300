"""A deterministic engine without a model, for tests of the HTTP layer only.

It follows the `serve.engine.Engine` contract exactly where the HTTP layer can observe it (a
bounded queue raising ``Overloaded``, ``EngineUnavailable`` while draining, batch slots, lazy
adapter loading with LRU eviction and pinning, abort, closing the stream aborts) but "generates"
token ids from a hash of the prompt, adapter and seed. Never used to serve real traffic: it is
registered as ``fake`` and hidden from the CLI help.

Options (``EngineConfig.options``; ``--engine-option KEY=VALUE`` on the CLI):
    token_delay_s: Sleep before each token (default 0).
    load_delay_s: Simulated adapter load time (default 0).
    vocab: ``LOW-HIGH`` range of generated ids (default ``300-5000``).
    eos_after: Emit the first stop token id after this many tokens (default: never).
    script: Comma-separated ids to emit instead of hashed ones.

Where the job ends: no tokenizer, no weights, no batching maths.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from hub.errors import Conflict, EngineUnavailable, InvalidInput, Overloaded
from hub.store import AdapterRecord
from serve.engine import EngineConfig, EngineHealth, GenerationRequest, TokenChunk


class FakeEngine:
    """See the module docstring."""

    name = "fake"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        opts = config.options
        self.token_delay_s = float(opts.get("token_delay_s", 0.0))
        self.load_delay_s = float(opts.get("load_delay_s", 0.0))
        low, _, high = str(opts.get("vocab", "300-5000")).partition("-")
        self.vocab = (int(low), int(high))
        eos_after = opts.get("eos_after")
        self.eos_after = int(eos_after) if eos_after not in (None, "") else None
        script = opts.get("script")
        self.script: list[int] | None = (
            [int(x) for x in str(script).split(",") if x.strip()] if script else None
        )
        self.status = "starting"
        self.resident: OrderedDict[str, int] = OrderedDict()  # key -> requests in flight
        self.running = 0
        self.waiting = 0
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self._abort_flags: dict[str, asyncio.Event] = {}
        self._slots: asyncio.Semaphore | None = None
        self._idle: asyncio.Event | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to load; become ready."""
        self._slots = asyncio.Semaphore(self.config.max_running)
        self._idle = asyncio.Event()
        self._idle.set()
        self.status = "ok"

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, wait for running ones up to the timeout, then abort the rest."""
        self.status = "draining"
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
            except TimeoutError:
                for event in self._abort_flags.values():
                    event.set()
        self.status = "failed" if self.running else "draining"

    # -- adapters -------------------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRecord) -> float:
        """Make ``NAME@V`` resident (simulated delay); evict the LRU idle one when full."""
        key = f"{adapter.name}@{adapter.version}"
        if key in self.resident:
            self.resident.move_to_end(key)
            return 0.0
        started = time.perf_counter()
        if self.load_delay_s:
            await asyncio.sleep(self.load_delay_s)
        while len(self.resident) >= self.config.max_adapters:
            idle = next((k for k, n in self.resident.items() if n == 0), None)
            if idle is None:
                raise Overloaded("Every resident adapter has requests in flight", retry_after_s=1)
            del self.resident[idle]
        self.resident[key] = 0
        return time.perf_counter() - started

    async def unload_adapter(self, key: str) -> bool:
        """Evict ``key``; False if not resident; Conflict if in use."""
        if key not in self.resident:
            return False
        if self.resident[key]:
            raise Conflict(f"Adapter {key} has {self.resident[key]} requests in flight",
                           fix="Retry when they finish.")
        del self.resident[key]
        return True

    # -- generation -----------------------------------------------------------------------

    def _ids(self, request: GenerationRequest) -> list[int]:
        params = request.params
        if self.script is not None:
            return list(self.script)
        key = f"{request.adapter.name}@{request.adapter.version}" if request.adapter else "-"
        seed = params.seed if params.temperature > 0 else 0
        digest = hashlib.sha256(f"{key}|{request.prompt_ids}|{seed}".encode()).digest()
        rng = random.Random(digest)
        count = params.max_tokens if self.eos_after is None else min(self.eos_after,
                                                                     params.max_tokens)
        ids = [rng.randrange(*self.vocab) for _ in range(count)]
        if self.eos_after is not None and count < params.max_tokens and params.stop_token_ids:
            ids.append(params.stop_token_ids[0])
        return ids

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream hashed ids one per chunk (see the module docstring)."""
        if self.status != "ok" or self._slots is None:
            raise EngineUnavailable(f"The fake engine is {self.status}", fix="Retry later.")
        if not request.prompt_ids:
            raise InvalidInput("Empty prompt", param="prompt")
        if self._slots.locked() and self.waiting >= self.config.max_queue:
            raise Overloaded(f"{self.waiting} requests are already waiting", retry_after_s=2)
        self.requests.append(request)
        abort = self._abort_flags[request.request_id] = asyncio.Event()
        key = None
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        assert self._idle is not None
        self._idle.clear()
        try:
            load_s = 0.0
            if request.adapter is not None:
                load_s = await self.load_adapter(request.adapter)
                key = f"{request.adapter.name}@{request.adapter.version}"
                self.resident[key] += 1
            ids = self._ids(request)
            stop_ids = set(request.params.stop_token_ids)
            for i, token_id in enumerate(ids):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if abort.is_set():
                    yield TokenChunk([], finish_reason="abort")
                    return
                last = i == len(ids) - 1 or token_id in stop_ids
                finish = None
                if last:
                    finish = "stop" if token_id in stop_ids else "length"
                chunk = TokenChunk([token_id], finish_reason=finish)
                if i == 0:
                    chunk.prompt_tokens = len(request.prompt_ids)
                    chunk.adapter_load_s = load_s
                if request.params.logprobs:
                    chunk.logprobs = [-0.25 * (1 + i % 4)]
                    chunk.top_logprobs = [{token_id: chunk.logprobs[0],
                                           **{token_id + k: -3.0 - k
                                              for k in range(1, request.params.top_logprobs)}}]
                yield chunk
                if last:
                    return
        finally:
            if key is not None and key in self.resident:
                self.resident[key] -= 1
            self._abort_flags.pop(request.request_id, None)
            self.running -= 1
            self._slots.release()
            if self.running == 0:
                self._idle.set()

    async def abort(self, request_id: str) -> None:
        """Ask a running request to stop at its next token."""
        self.aborted.append(request_id)
        event = self._abort_flags.get(request_id)
        if event is not None:
            event.set()

    def health(self) -> EngineHealth:
        """Snapshot."""
        return EngineHealth(
            status=self.status,  # type: ignore[arg-type]
            engine=self.name,
            base=self.config.base.name,
            resident_adapters=list(self.resident),
            running=self.running,
            waiting=self.waiting,
            detail=f"aborted={len(self.aborted)}",
        )
