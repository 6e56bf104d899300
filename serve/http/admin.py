"""Admin routes: ``POST /v1/adapters/{name}/load`` and ``DELETE /v1/adapters/{name}``.

``name`` is ``NAME`` (latest version) or ``NAME@V``. Loading makes the adapter resident now (a
pre-warm, so the first request does not pay the load); unloading evicts it (all resident
versions for a bare ``NAME``). With ``--api-keys`` only admin keys may call them.

vLLM's runtime LoRA routes work the same way, so tools written for them need no change:
``POST /v1/load_lora_adapter`` ``{"lora_name": ..., "lora_path": ...}`` and
``POST /v1/unload_lora_adapter`` ``{"lora_name": ...}``, answering vLLM's plain-text
``Success: ...`` with 200. ``lora_name`` is a hub name (``NAME``, ``NAME@V`` or
``BASE+NAME[@V]``); adapters are never loaded from a filesystem path, so ``lora_path`` may only
repeat the hub name (register a folder with ``loradock hub register`` first).

Where the job ends: translating the routes to `Engine.load_adapter` / `Engine.unload_adapter`;
residency policy is the engine's.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from hub.errors import Incompatible, InvalidInput, NotFound
from hub.names import parse_adapter_ref
from hub.store import AdapterRecord
from serve.http.auth import Principal
from serve.http.state import AppState, app_state, caller, read_json

router = APIRouter()


@router.post("/v1/adapters/{name}/load")
async def load_adapter(
    name: str, request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> dict:
    """Make ``NAME`` or ``NAME@V`` resident; returns the load time in seconds."""
    principal.require_admin()
    state = app_state(request)
    state.check_accepting()
    record, seconds = await _load(state, name, "name")
    return {"object": "adapter", "id": record.model, "name": record.name,
            "version": record.version, "loaded": True, "load_time_s": round(seconds, 6)}


async def _load(state: AppState, name: str, param: str) -> tuple[AdapterRecord, float]:
    adapter, version = parse_adapter_ref(name)
    record = await asyncio.to_thread(state.store.get, adapter, version)
    if record.base != state.base.name:
        raise Incompatible(
            f"Adapter {record.name}@{record.version} belongs to base {record.base!r}, not "
            f"{state.base.name!r} (the base this server serves)",
            fix="Load it on a server started with --base " + record.base + ".",
            param=param,
        )
    seconds = await state.engine.load_adapter(record)
    if seconds > 0:
        state.metrics.observe_adapter_load(seconds, f"{record.name}@{record.version}")
    return record, seconds


@router.delete("/v1/adapters/{name}")
async def unload_adapter(
    name: str, request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> dict:
    """Evict ``NAME@V`` (or every resident version of ``NAME``)."""
    principal.require_admin()
    state = app_state(request)
    adapter, unloaded = await _unload(state, name)
    return {"object": "adapter", "name": adapter, "unloaded": unloaded}


async def _unload(state: AppState, name: str) -> tuple[str, list[str]]:
    adapter, version = parse_adapter_ref(name)
    if version is not None:
        keys = [f"{adapter}@{version}"]
    else:
        keys = [k for k in state.engine.health().resident_adapters
                if k.partition("@")[0] == adapter]
    return adapter, [key for key in keys if await state.engine.unload_adapter(key)]


# -- vLLM-compatible routes ---------------------------------------------------------------------


class _LoraRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str | None = Field(None, max_length=4096)
    lora_int_id: int | None = None
    load_inplace: bool | None = None


def _hub_name(state: AppState, body: _LoraRequest) -> str:
    """``lora_name`` without a ``BASE+`` prefix; ``lora_path`` may only repeat it."""
    name = body.lora_name
    base, plus, rest = name.partition("+")
    if plus:
        if base != state.base.name:
            raise NotFound(f"The adapter {name[:120]!r} is not for this server's base "
                           f"{state.base.name!r}", fix="Use NAME, NAME@V or "
                           f"{state.base.name}+NAME.", param="lora_name")
        name = rest
    if body.lora_path not in (None, "", body.lora_name, name):
        raise InvalidInput("'lora_path' must be the adapter's hub name: this server loads "
                           "adapters from its hub, never from a filesystem path",
                           fix="Register the folder with `loradock hub register FOLDER NAME`, "
                               "then send lora_name=NAME.", param="lora_path")
    return name


async def _lora_body(request: Request, state: AppState) -> _LoraRequest:
    from serve.http.errors import validation_error

    data = await read_json(request, 64 * 1024)
    try:
        return _LoraRequest.model_validate(data)
    except ValueError as exc:
        raise validation_error(exc) from None  # type: ignore[arg-type]


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def vllm_load_lora_adapter(
    request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> PlainTextResponse:
    """Load ``lora_name`` (a hub name) as vLLM's runtime LoRA API does."""
    principal.require_admin()
    state = app_state(request)
    state.check_accepting()
    body = await _lora_body(request, state)
    await _load(state, _hub_name(state, body), "lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def vllm_unload_lora_adapter(
    request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> PlainTextResponse:
    """Evict ``lora_name`` as vLLM's runtime LoRA API does; 404 when it is not resident."""
    principal.require_admin()
    state = app_state(request)
    body = await _lora_body(request, state)
    _, unloaded = await _unload(state, _hub_name(state, body))
    if not unloaded:
        raise NotFound(f"The LoRA adapter {body.lora_name[:120]!r} is not loaded",
                       fix="See GET /health for the resident adapters.", param="lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
