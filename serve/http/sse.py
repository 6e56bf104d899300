"""Server-sent events (``data: {json}`` chunks, ``data: [DONE]``) and noticing a client leave.

`SSEResponse` sends the events of an async iterator while listening for ``http.disconnect``, so a
client that goes away stops the stream at once, even while the engine has no token to send yet
(Starlette's own StreamingResponse only notices on the next write with ASGI 2.4 servers). Its
``on_close`` callback always runs, shielded from cancellation: that is where the engine request is
aborted and its slot freed.

Where the job ends: the wire format and the connection. What the events say is the routes' job.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: Mapping[str, Any]) -> bytes:
    """One SSE event carrying ``payload`` as compact JSON."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone (call only once the request body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """Streams ``events`` as ``text/event-stream`` and calls ``on_close(disconnected)`` at the end.

    Args:
        events: The encoded events (see `sse_data` and `DONE`).
        on_close: Awaited once, shielded, with True if the client left before the end.
        headers: Extra response headers.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[bool], Awaitable[None]],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        finished = False

        async def stream(scope_to_cancel: anyio.CancelScope) -> None:
            nonlocal disconnected, finished
            try:
                await send({
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                })
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
            except OSError:
                disconnected = True
            scope_to_cancel.cancel()

        async def watch(scope_to_cancel: anyio.CancelScope) -> None:
            nonlocal disconnected
            await wait_for_disconnect(receive)
            if not finished:
                disconnected = True
            scope_to_cancel.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(stream, group.cancel_scope)
                group.start_soon(watch, group.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                close = getattr(self.events, "aclose", None)
                if close is not None:
                    await close()
                await self.on_close(disconnected and not finished)
