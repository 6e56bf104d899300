"""The ingress deployment: ``loradock serve``'s own FastAPI app, its engine a Ray handle.

`Ingress` builds the same `serve.http.state.AppState` and `serve.http.app.create_app` as the
single-process server (routes, auth, error envelopes, metrics), with two differences: the store
is a `serve.ray.catalog.RemoteCatalog` (model strings resolve to the remote's published content
without downloading weights) and the engine is a `RayEngine`, which forwards each generation to
the engine deployment's handle with ``multiplexed_model_id`` set to the adapter's content id, so
Ray Serve routes it to a replica that holds that content (or loads it there).

`ReplicaHeader` names the replica(s) that served a request in the ``x-loradock-replica`` response
header; `RayEngine.metrics_lines` adds each replica's resident adapters to ``/metrics`` (as last
reported by that replica with a response).

Where the job ends: forwarding. Resolution is the catalog's, routing Ray's, generation the
replicas'.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hub.errors as errors
from hub.errors import EngineUnavailable, LoradockError
from hub.records import AdapterRecord
from serve.engine import EngineHealth, GenerationRequest, TokenChunk
from serve.http.metrics import PREFIX

log = logging.getLogger("loradock.serve.ray")
REPLICA_HEADER = "x-loradock-replica"
_SERVED_BY: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "loradock_served_by", default=None)


def rebuild_error(item: dict[str, Any]) -> LoradockError:
    """The domain error a replica sent as data (`serve.ray.replica.error_item`)."""
    kind = getattr(errors, str(item.get("kind")), None)
    if not (isinstance(kind, type) and issubclass(kind, LoradockError)):
        kind = LoradockError
    return kind(str(item.get("message", "")), fix=str(item.get("fix") or ""),
                param=item.get("param"))


class ReplicaHeader:
    """ASGI middleware: ``x-loradock-replica: ID[,ID...]`` on responses an engine replica served.

    The set is shared through a context variable that the request's tasks inherit, so
    `RayEngine.generate` (run inside them) can add to it before the response starts.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        served: set[str] = set()
        token = _SERVED_BY.set(served)

        async def named_send(message: dict) -> None:
            if message["type"] == "http.response.start" and served:
                value = ",".join(sorted(served)).encode()
                message = {**message,
                           "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(),
                                                                     value)]}
            await send(message)

        try:
            await self.app(scope, receive, named_send)
        finally:
            _SERVED_BY.reset(token)


class RayEngine:
    """The `serve.engine.Engine` the ingress's app drives: a front for the engine deployment.

    Args:
        handle: The engine deployment's ``DeploymentHandle``.
        engine: The engine the replicas run (``peft``...); also this object's ``name``.
        base: The base model's name.
        show_names: Whether ``/metrics`` may name resident adapters (only without API keys).
    """

    def __init__(self, handle: Any, engine: str, base: str, *, show_names: bool) -> None:
        self.name = engine
        self._handle = handle
        self._base = base
        self._show_names = show_names
        self._inflight: dict[str, Any] = {}
        self._reports: dict[str, tuple[float, list[str]]] = {}

    async def start(self) -> None:
        """Nothing to start: Ray Serve starts the replicas."""

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Nothing to stop: Ray Serve drains and stops the replicas."""

    def _note(self, header: dict[str, Any]) -> None:
        replica = str(header["replica"])
        self._reports[replica] = (time.monotonic(), list(header.get("resident") or []))
        served = _SERVED_BY.get()
        if served is not None:
            served.add(replica)

    async def load_adapter(self, adapter: AdapterRecord) -> float:
        """Pre-warm ``adapter`` on the replica Ray routes its content id to."""
        from serve.ray.catalog import content_id

        header = await self._handle.options(multiplexed_model_id=content_id(adapter)).warm.remote()
        if "error" in header:
            raise rebuild_error(header["error"])
        self._note(header)
        return float(header["load_s"])

    async def unload_adapter(self, key: str) -> bool:
        """Not routable to every replica: Ray's LRU evicts (False: nothing unloaded here)."""
        return False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream the request from the replica Ray picks for its adapter's content id."""
        from serve.ray.catalog import content_id

        model_id = content_id(request.adapter) if request.adapter is not None else ""
        constraint = request.params.constraint
        if constraint is not None:  # compiled grammars do not pickle: the replica recompiles
            spec = {"kind": constraint.kind, "schema": constraint.schema,
                    "strict": constraint.strict}
            request = dataclasses.replace(
                request, params=dataclasses.replace(request.params, constraint=spec))
        response = self._handle.options(stream=True, multiplexed_model_id=model_id
                                        ).generate.remote(request)
        self._inflight[request.request_id] = response
        finished = False
        try:
            async for item in response:
                if isinstance(item, dict):
                    if "error" in item:
                        raise rebuild_error(item["error"])
                    self._note(item)
                    continue
                yield item
            finished = True
        except LoradockError:
            finished = True
            raise
        except Exception as exc:
            finished = True
            log.warning("request %s: engine replica failed: %s", request.request_id,
                        type(exc).__name__)
            raise EngineUnavailable(
                f"The engine replica serving this request failed ({type(exc).__name__})",
                fix="Retry the request; Ray Serve restarts failed replicas.") from None
        finally:
            self._inflight.pop(request.request_id, None)
            if not finished:
                response.cancel()

    async def abort(self, request_id: str) -> None:
        """Cancel the request's stream (its replica then frees the slot)."""
        response = self._inflight.pop(request_id, None)
        if response is not None:
            response.cancel()

    def health(self) -> EngineHealth:
        """The ingress's view: ok, requests in flight, adapters the replicas last reported."""
        resident = sorted({key for _, keys in self._reports.values() for key in keys})
        return EngineHealth(status="ok", engine=f"{self.name} (ray)", base=self._base,
                            resident_adapters=resident, running=len(self._inflight))

    def metrics_lines(self) -> list[str]:
        """Per-replica resident adapters (names only on a server without API keys)."""
        p = PREFIX
        now = time.monotonic()
        out = [f"# HELP {p}_replica_adapters_resident Adapters resident per engine replica "
               "(as last reported).", f"# TYPE {p}_replica_adapters_resident gauge"]
        out += [f'{p}_replica_adapters_resident{{replica="{r}"}} {len(keys)}'
                for r, (_, keys) in sorted(self._reports.items())]
        out += [f"# HELP {p}_replica_report_age_seconds Seconds since the replica's last report.",
                f"# TYPE {p}_replica_report_age_seconds gauge"]
        out += [f'{p}_replica_report_age_seconds{{replica="{r}"}} {now - at:.3f}'
                for r, (at, _) in sorted(self._reports.items())]
        if self._show_names:
            out += [f"# HELP {p}_replica_adapter_resident 1 for each adapter a replica holds.",
                    f"# TYPE {p}_replica_adapter_resident gauge"]
            out += [f'{p}_replica_adapter_resident{{replica="{r}",adapter="{key}"}} 1'
                    for r, (_, keys) in sorted(self._reports.items()) for key in keys]
        return out


class Ingress:
    """The ingress deployment's class (``serve.ingress()`` late-binds the app it builds).

    Args:
        engine_handle: The engine deployment's handle (Ray passes it for the bound deployment).
        settings: ``{"server": ServerConfig fields, "ray": {...}}``.
    """

    def __init__(self, engine_handle: Any, settings: dict[str, Any]) -> None:
        from hub.store import Store, default_home
        from serve.http.auth import ApiKeys
        from serve.http.state import AppState
        from serve.ray.catalog import RemoteCatalog

        server = dict(settings["server"])
        home = Path(server["home"]) if server.get("home") else default_home()
        cache = Path(server["cache"]) if server.get("cache") else None
        if server.get("remote"):
            store: Store = RemoteCatalog(home / "ray-ingress", server["remote"], cache=cache)
        else:
            store = Store(home, cache)
        base = store.base(server["base"])
        keys = ApiKeys.load(Path(server["api_keys"])) if server.get("api_keys") else None
        max_model_len = min(int(server["max_model_len"]),
                            base.context_length or int(server["max_model_len"]))
        engine = RayEngine(engine_handle, server["engine"], base.name, show_names=keys is None)
        self.state = AppState(
            store=store, base=base, engine=engine, keys=keys, max_model_len=max_model_len,
            request_timeout_s=float(server["request_timeout_s"]),
            max_body_bytes=int(server["max_body_bytes"]),
            drain_timeout_s=float(server["drain_timeout_s"]),
        )

    def __serve_build_asgi_app__(self) -> Any:
        from serve.http.app import create_app

        app = create_app(self.state, ui=False)
        app.add_middleware(ReplicaHeader)
        return app

