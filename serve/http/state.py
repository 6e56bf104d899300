"""What every request handler shares: the store, the engine, the formatter, keys and metrics.

`AppState` lives on ``app.state.loradock`` (built by `serve.server` or by tests, passed to
`serve.http.app.create_app`). Request bodies are read here with a hard size limit before any JSON
parsing, and the caller's key is checked here (`caller`, a FastAPI dependency).

Where the job ends: shared plumbing. Endpoint logic is in the route modules, generation in
`serve.http.generation`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError

from hub.bases import BaseInfo
from hub.errors import EngineUnavailable, InvalidInput
from hub.store import Store
from serve.chat import Formatter
from serve.engine import Engine
from serve.http.auth import ApiKeys, Principal
from serve.http.errors import BodyTooLarge, validation_error
from serve.http.metrics import Metrics
from serve.http.protocol import check_fields

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
# Bodies up to this size are read (and dropped) before answering 413, so that clients which
# send the whole body before reading the answer get the error instead of a reset connection.
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
T = TypeVar("T")


@dataclass
class AppState:
    """Shared state of one server.

    Attributes:
        store: Where models are resolved (per request, so new versions are seen at once).
        base: The one base this server serves.
        engine: The inference engine.
        formatter: Chat templates and tokenizer; built at startup when None.
        keys: API keys, or None for an open (localhost-only) server.
        max_model_len: Longest prompt + completion in tokens.
        request_timeout_s: Per-request limit from arrival to the last token.
        max_body_bytes: Largest request body accepted.
        drain_timeout_s: How long shutdown waits for running requests.
        metrics: Prometheus counters.
        draining: Set on SIGTERM: new requests get 503.
    """

    store: Store
    base: BaseInfo
    engine: Engine
    formatter: Formatter | None = None
    keys: ApiKeys | None = None
    max_model_len: int = 2048
    request_timeout_s: float = 600.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout_s: float = 30.0
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
    )

    @property
    def fmt(self) -> Formatter:
        """The formatter (raises if startup has not built it yet)."""
        if self.formatter is None:
            raise EngineUnavailable("The server is still starting", fix="Retry in a few seconds.")
        return self.formatter

    @property
    def system_fingerprint(self) -> str:
        """Identifies the base weights and engine (``system_fingerprint`` in responses)."""
        return f"fp_{self.base.fingerprint[:10]}_{self.engine.name}"

    async def tokenize(self, fn: Callable[..., T], *args: Any) -> T:
        """Run tokenizer work off the event loop, one call at a time.

        HF fast tokenizers are not safe to share between threads, hence one worker.
        """
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """Release the tokenizer worker (after the engine has shut down)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_accepting(self) -> None:
        """Refuse new work while draining.

        Raises:
            EngineUnavailable: After SIGTERM or while the engine is not ok.
        """
        if self.draining:
            raise EngineUnavailable(
                "The server is shutting down and takes no new requests",
                fix="Retry against another replica or after the restart.",
            )


def app_state(request: Request) -> AppState:
    """The `AppState` of the app serving ``request``."""
    return request.app.state.loradock


async def caller(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller (everyone on a server without keys).

    Raises:
        AuthError: With keys configured, a missing or wrong key.
    """
    keys = app_state(request).keys
    if keys is None:
        return Principal(None)
    return keys.authenticate(request.headers.get("authorization"))


async def read_json(request: Request, limit: int) -> Any:
    """Read the body (at most ``limit`` bytes) and parse it as strict JSON.

    Raises:
        BodyTooLarge: Over ``limit`` (by Content-Length or by counting).
        InvalidInput: Not UTF-8 JSON, or NaN/Infinity, or nested too deeply.
    """
    declared = request.headers.get("content-length")
    too_large = BodyTooLarge(
        f"The request body is over the limit of {limit // 1024} KiB",
        fix="Send a shorter prompt.",
    )
    if declared and declared.isdigit() and int(declared) > _DRAIN_LIMIT_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DRAIN_LIMIT_BYTES:
            break
    if size > limit:
        raise too_large
    raw = b"".join(chunks)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise InvalidInput(
            f"The request body is not valid JSON ({detail})",
            fix="Send a UTF-8 JSON object with Content-Type: application/json.",
        ) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(data: Any, model: type[T]) -> T:
    """Check fields by name, then types and ranges, then cross-field rules.

    Raises:
        InvalidInput: Naming the offending field.
    """
    data = check_fields(data, model)  # type: ignore[arg-type]
    try:
        body = model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise validation_error(exc) from None
    body.check()
    return body
