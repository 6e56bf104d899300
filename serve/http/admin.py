"""Admin routes: ``POST /v1/adapters/{name}/load`` and ``DELETE /v1/adapters/{name}``.

``name`` is ``NAME`` (latest version) or ``NAME@V``. Loading makes the adapter resident now (a
pre-warm, so the first request does not pay the load); unloading evicts it (all resident
versions for a bare ``NAME``). With ``--api-keys`` only admin keys may call them.

Where the job ends: translating the routes to `Engine.load_adapter` / `Engine.unload_adapter`;
residency policy is the engine's.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from hub.errors import Incompatible
from hub.names import parse_adapter_ref
from serve.http.auth import Principal
from serve.http.state import app_state, caller

router = APIRouter()


@router.post("/v1/adapters/{name}/load")
async def load_adapter(
    name: str, request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> dict:
    """Make ``NAME`` or ``NAME@V`` resident; returns the load time in seconds."""
    principal.require_admin()
    state = app_state(request)
    state.check_accepting()
    adapter, version = parse_adapter_ref(name)
    record = await asyncio.to_thread(state.store.get, adapter, version)
    if record.base != state.base.name:
        raise Incompatible(
            f"Adapter {record.name}@{record.version} belongs to base {record.base!r}, not "
            f"{state.base.name!r} (the base this server serves)",
            fix="Load it on a server started with --base " + record.base + ".",
            param="name",
        )
    seconds = await state.engine.load_adapter(record)
    if seconds > 0:
        state.metrics.observe_adapter_load(seconds, f"{record.name}@{record.version}")
    return {"object": "adapter", "id": record.model, "name": record.name,
            "version": record.version, "loaded": True, "load_time_s": round(seconds, 6)}


@router.delete("/v1/adapters/{name}")
async def unload_adapter(
    name: str, request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> dict:
    """Evict ``NAME@V`` (or every resident version of ``NAME``)."""
    principal.require_admin()
    state = app_state(request)
    adapter, version = parse_adapter_ref(name)
    if version is not None:
        keys = [f"{adapter}@{version}"]
    else:
        keys = [k for k in state.engine.health().resident_adapters
                if k.partition("@")[0] == adapter]
    unloaded = [key for key in keys if await state.engine.unload_adapter(key)]
    return {"object": "adapter", "name": adapter, "unloaded": unloaded}
