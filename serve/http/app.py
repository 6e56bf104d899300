"""The FastAPI application: ``create_app(state)`` wires routes, error envelopes and metrics.

State lives on ``app.state.loradock`` (an `AppState`). The app's lifespan starts the engine and
loads the tokenizer (concurrently) before the first request is accepted, and on shutdown marks
the server draining and lets the engine finish running requests (`Engine.shutdown`).

Where the job ends: composition. Process concerns (host/port, signals, uvicorn) are
`serve.server`'s; endpoint logic is in the route modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.chat import Formatter
from serve.http import admin, chat, completions, health, models
from serve.http.errors import install_handlers
from serve.http.metrics import Metrics
from serve.http.state import AppState
from serve.ui import install_api_docs, install_console

log = logging.getLogger("loradock.serve")
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
           "/docs", "/openapi.json", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def route_label(path: str) -> str:
    """A bounded label for a request path (unknown paths are all ``other``)."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path == "/" or path.startswith("/ui/"):
        return "console"
    return "other"


class CountRequests:
    """ASGI middleware counting every response by route and status.

    Pure ASGI (not BaseHTTPMiddleware), so streaming and disconnect detection are untouched.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_request(route_label(scope.get("path", "")), status)


def create_app(state: AppState, *, ui: bool = True) -> FastAPI:
    """Build the app around ``state`` (the engine is started by the app's lifespan).

    ``ui`` adds the web console at ``/`` (`serve.ui`); ``/docs`` is served either way.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async def load_formatter() -> None:
            if state.formatter is None:
                state.formatter = await asyncio.to_thread(Formatter, state.base)

        # One after the other: transformers 5's lazy module import is not thread-safe, and
        # loading the tokenizer and the model in two threads at once failed 2 starts in 9 with
        # "cannot import name 'AutoModelForCausalLM'". The tokenizer takes about a second.
        await load_formatter()
        await state.engine.start()
        log.info("serving base %s with engine %s", state.base.name, state.engine.name)
        try:
            yield
        finally:
            state.draining = True
            log.info("draining: waiting up to %.0f s for running requests",
                     state.drain_timeout_s)
            await state.engine.shutdown(state.drain_timeout_s)
            state.close()
            log.info("engine stopped")

    app = FastAPI(
        title="loradock",
        summary="OpenAI-compatible server for many LoRA adapters on one base model.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.loradock = state
    for module in (chat, completions, models, admin, health):
        app.include_router(module.router)
    install_api_docs(app)
    if ui:
        install_console(app)
    install_handlers(app)
    app.add_middleware(CountRequests, metrics=state.metrics)
    return app
