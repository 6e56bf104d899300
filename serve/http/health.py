"""``GET /health`` (200 when serving, 503 while starting, draining or failed) and ``GET /metrics``.

Both are open (no key needed) and say nothing a caller could use to learn adapter names when
keys are configured: ``/health`` lists resident adapters only on a server without keys, and
metric labels carry only routes and status codes.

Where the job ends: reporting. The numbers come from `Engine.health` and `serve.http.metrics`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from serve.http.state import app_state

router = APIRouter()
_STARTED = time.monotonic()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Engine state; 200 only when requests will be served."""
    state = app_state(request)
    info = state.engine.health()
    status = "draining" if state.draining else info.status
    if state.formatter is None and status == "ok":
        status = "starting"
    body = {
        "status": status,
        "engine": info.engine,
        "base": state.base.name,
        "running": info.running,
        "waiting": info.waiting,
        "adapters_resident": len(info.resident_adapters),
        "uptime_s": round(time.monotonic() - _STARTED, 3),
    }
    if state.keys is None:
        body["resident_adapters"] = list(info.resident_adapters)
    if info.detail and status != "ok":
        body["detail"] = info.detail
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition."""
    state = app_state(request)
    text = state.metrics.render(state.engine.health())
    extra = getattr(state.engine, "metrics_lines", None)  # an engine's own samples (Ray's)
    if extra is not None:
        text += "\n".join(extra()) + "\n"
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
