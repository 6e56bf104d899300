"""One engine replica: our engine behind Ray Serve's model multiplexing.

`EngineReplica` is the class the engine deployment runs (`serve.ray.app` wraps it with
``serve.deployment``). Each replica opens its own store (a folder of its own under
``LORADOCK_HOME/ray-replicas/``, pulling from the remote; the converted base cache is shared),
creates and starts the engine, and serves `EngineReplica.generate` as a stream.

The multiplexed model id of a request is the adapter's content id (``NAME@V:DIGEST``). The first
request for an id on a replica loads it through `EngineReplica.adapter` (``@serve.multiplexed``,
at most ``max_adapters`` per replica): a lazy, pinned, digest-checked pull into the replica's
store, a check that the copy is the content the id names, then `Engine.load_adapter`. When Ray's
LRU evicts an id, it awaits the returned `ResidentAdapter`'s ``__del__``, which unloads it from
the engine and, with a remote, removes the copy from the replica's store, so its disk holds what
its memory holds and a reload is one verified pull (an adapter still in use stays, in memory
and on disk, until the engine's own LRU drains it).

Stream items: first a dict ``{"replica", "resident", "load_s"}``, then `TokenChunk` objects; a
domain error is sent as ``{"error": {...}}`` (rebuilt by the ingress) instead of being pickled.

Where the job ends: the replica's side of one request. Routing and eviction order are Ray's,
batching the engine's, HTTP the ingress's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hub.errors import LoradockError, StoreCorrupt
from hub.records import AdapterRecord
from serve.engine import GenerationRequest, adapter_key

log = logging.getLogger("loradock.serve.ray")


def error_item(exc: LoradockError) -> dict[str, Any]:
    """A domain error as plain data (its class name and fields)."""
    return {"error": {"kind": type(exc).__name__, "message": exc.message, "fix": exc.fix,
                      "param": exc.param}}


class ResidentAdapter:
    """What Ray's multiplexer holds per model id; its ``__del__`` (awaited by Ray) unloads it."""

    def __init__(self, replica: EngineReplica, record: AdapterRecord) -> None:
        self.record = record
        self._replica = replica
        # An instance attribute, not a method: Ray awaits it on eviction, the garbage collector
        # (which calls the type's __del__ only) never sees a coroutine.
        self.__del__ = self._unload

    async def _unload(self) -> None:
        await self._replica.evicted(self.record)


class EngineReplica:
    """The engine deployment's class (see the module docstring).

    Args:
        settings: ``{"server": ServerConfig fields, "ray": {...}}`` (`serve.ray.app.RaySettings`).
    """

    async def __init__(self, settings: dict[str, Any]) -> None:
        from ray import serve

        from hub.store import Store, default_home
        from serve.engine import EngineConfig, create_engine

        server = settings["server"]
        self.max_adapters = int(server["max_adapters"])
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        home = Path(server["home"]) if server.get("home") else default_home()
        remote = server.get("remote")
        cache = os.environ.get("LORADOCK_CACHE") or str(home / "cache")
        self.private_store = bool(remote)
        if remote:  # a store of its own: nothing here that the remote cannot rebuild
            self.store = Store(home / "ray-replicas" / self.replica_id, Path(cache), remote=remote)
        else:  # no remote: the node's store, shared by the replicas on it
            self.store = Store(home, Path(cache))
        base = await asyncio.to_thread(self.store.base, server["base"])
        self.base = base
        self._formatter: Any = None  # tokenizer for recompiling constraints, at first use
        self.loads = 0
        self.evictions = 0
        config = EngineConfig(
            base=base, base_dtype=server["base_dtype"], device=server["device"],
            max_adapters=self.max_adapters, max_running=int(server["max_running"]),
            max_queue=int(server["max_queue"]),
            max_model_len=min(int(server["max_model_len"]),
                              base.context_length or int(server["max_model_len"])),
            max_lora_rank=int(server["max_lora_rank"]), threads=int(server["threads"]),
            options=dict(server.get("engine_options") or {}),
        )
        self.engine = create_engine(server["engine"], config)
        await self.engine.start()

        async def load(model_id: str) -> ResidentAdapter:
            return await self._load(model_id)

        # Wired per instance (Ray detects that) so that --max-adapters sets the LRU's size.
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=self.max_adapters)(load)
        log.info("replica %s serving %s with engine %s", self.replica_id, base.name,
                 self.engine.name)

    async def _load(self, model_id: str) -> ResidentAdapter:
        """Ray's model loader: pull (once, verified), check the content, load into the engine."""
        from serve.ray.catalog import parse_content_id

        name, version, digest = parse_content_id(model_id)
        record = await asyncio.to_thread(self.store.get, name, version)
        if record.digest != digest:
            raise StoreCorrupt(
                f"Adapter {name}@{version} held by replica {self.replica_id} has digest "
                f"{record.digest[:12]}, but the remote now publishes {digest[:12]} for it (the "
                "tag was moved to other content)",
                fix="Publish changed content as a new version; a moved tag is not served.",
                param="model")
        self.loads += 1
        await self.engine.load_adapter(record)
        return ResidentAdapter(self, record)

    async def evicted(self, record: AdapterRecord) -> None:
        """Ray's LRU dropped ``record``: unload it from the engine unless it is still in use."""
        from hub.errors import Conflict

        self.evictions += 1
        try:
            await self.engine.unload_adapter(adapter_key(record))
        except Conflict:  # requests still use it; the engine's own LRU drains it later
            log.info("replica %s: %s evicted by Ray while in use", self.replica_id,
                     adapter_key(record))
            return
        if self.private_store:  # the disk holds what memory holds; the remote backs both
            await asyncio.to_thread(self.store.remove, record.name, record.version)

    def _constraint(self, spec: dict[str, Any]) -> Any:
        """Compile the ingress's constraint again here (xgrammar's grammars do not pickle)."""
        if self._formatter is None:
            from serve.chat import Formatter

            self._formatter = Formatter(self.base)
        grammars = self._formatter.grammars
        if spec["kind"] == "json_object":
            return grammars.json_object()
        return grammars.json_schema(spec["schema"], param="response_format",
                                    strict=bool(spec["strict"]))

    def _header(self, load_s: float) -> dict[str, Any]:
        return {"replica": self.replica_id, "load_s": load_s, "loads": self.loads,
                "evictions": self.evictions,
                "resident": list(self.engine.health().resident_adapters)}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Any]:
        """Stream one request's header, then its `TokenChunk` objects (errors as data)."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        started = time.monotonic()
        try:
            if model_id:
                resident = await self._multiplexed(model_id)
                request.adapter = resident.record
            load_s = time.monotonic() - started if model_id else 0.0
            if isinstance(request.params.constraint, dict):
                request.params.constraint = await asyncio.to_thread(
                    self._constraint, request.params.constraint)
            stream = self.engine.generate(request)
            yield self._header(load_s)
            first = True
            async for chunk in stream:
                if first and load_s > 0 and not chunk.adapter_load_s:
                    chunk.adapter_load_s = load_s  # loaded by Ray's multiplexer, not the engine
                first = False
                yield chunk
        except LoradockError as exc:
            yield error_item(exc)

    async def warm(self) -> dict[str, Any]:
        """Make the request's multiplexed model id resident here (the admin load route)."""
        from ray import serve

        started = time.monotonic()
        try:
            await self._multiplexed(serve.get_multiplexed_model_id())
        except LoradockError as exc:
            return error_item(exc)
        return self._header(time.monotonic() - started)

    async def stats(self) -> dict[str, Any]:
        """This replica's id, resident adapters and counters (for tests and ops)."""
        return self._header(0.0)

    async def abort(self, request_id: str) -> None:
        """Stop a request (no-op if it finished)."""
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        """Ray's health probe: fail when the engine has failed (Serve then restarts us)."""
        health = self.engine.health()
        if health.status == "failed":
            raise RuntimeError(f"engine failed: {health.detail}")
