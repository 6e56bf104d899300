"""Every error leaves the server as an OpenAI envelope: ``{"error": {message, type, param, code}}``.

Domain errors (`hub.errors.*`) carry their status, type and code; this module only translates
them. The few errors that exist only at the HTTP edge (bad API key, body too large, timeout,
malformed JSON) are defined here in the same shape. FastAPI's own validation and routing errors
are caught too, so no client ever sees FastAPI's default ``{"detail": ...}`` body.

Where the job ends: translation and the handlers that apply it. Deciding which error to raise is
the job of the code that detects it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hub.errors import InvalidInput, LoradockError

log = logging.getLogger("loradock.serve")


class AuthError(LoradockError):
    """Missing or wrong API key."""

    http_status = 401
    code = "invalid_api_key"


class Forbidden(LoradockError):
    """A valid key that may not use an admin route."""

    http_status = 403
    error_type = "permission_error"
    code = "forbidden"


class BodyTooLarge(LoradockError):
    """The request body is over the size limit."""

    http_status = 413
    code = "request_too_large"


class RequestTimeout(LoradockError):
    """The request ran past the server's per-request timeout."""

    http_status = 504
    error_type = "timeout_error"
    code = "timeout"


def error_payload(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Build the OpenAI error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def envelope(exc: LoradockError) -> dict[str, Any]:
    """The envelope for a domain error (its one-line message includes the fix)."""
    return error_payload(exc.one_line(), exc.error_type, exc.param, exc.code)


def error_response(exc: LoradockError) -> JSONResponse:
    """A JSON response for a domain error, with ``Retry-After`` on 429 (and 503 while draining)."""
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None or exc.http_status == 429:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(envelope(exc), status_code=exc.http_status, headers=headers)


def validation_error(
    exc: ValidationError | RequestValidationError, prefix: str = ""
) -> InvalidInput:
    """Turn pydantic's error list into one InvalidInput naming the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [p for p in first.get("loc", ()) if p not in ("body", "path", "query")]
    param = _loc_to_param(loc) or None
    message = str(first.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if first.get("type") == "extra_forbidden":
        text = f"Unrecognized request argument supplied: '{param}'"
    elif first.get("type") == "missing":
        text = f"Missing required parameter: '{param}'"
    else:
        text = f"Invalid value for '{param}': {message}" if param else message
    more = len(errors) - 1
    if more > 0:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return InvalidInput(prefix + text, param=param)


def _loc_to_param(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def install_handlers(app: FastAPI) -> None:
    """Route every error FastAPI or our code raises to an envelope."""

    @app.exception_handler(LoradockError)
    async def _domain(_request: Request, exc: LoradockError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail) if exc.detail else "HTTP error"
        if exc.status_code == 404:
            message = "Unknown route; see /v1/models, /v1/chat/completions, /v1/completions"
        payload = error_payload(message, "invalid_request_error", None, code)
        return JSONResponse(payload, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_request: Request, _exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody is listening; counted in /metrics

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc_info=exc)
        payload = error_payload(
            "The server failed on this request; see its log.", "server_error", None,
            "internal_error",
        )
        return JSONResponse(payload, status_code=500)
