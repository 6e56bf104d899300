"""Who is looking at the console: the same API keys and rules as the HTTP API.

A browser cannot add an ``Authorization`` header to a link it follows, so the console's key
page stores the key the person types in a cookie (``loradock_key``, ``SameSite=Strict``, scoped to
this server) that the page's own JavaScript also reads to call ``/v1`` with a Bearer header.
The cookie is honoured only by the console's read-only GET pages and by ``/docs`` and
``/openapi.json``; every ``/v1`` route still takes the Authorization header alone, so the cookie
cannot be used to make a request on the person's behalf from another site. An Authorization
header, when sent, wins over the cookie (scripts and the benchmark use it).

Where the job ends: turning a request into a `Principal` (or "ask for a key"). What a principal
may see is `serve.http.auth`'s rule, applied by `serve.ui.catalog`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from serve.http.auth import Principal
from serve.http.errors import AuthError
from serve.http.state import app_state

COOKIE = "loradock_key"


@dataclass(frozen=True)
class Viewer:
    """The console's caller.

    Attributes:
        principal: Who they are (None: a key is needed and none valid was given).
        keys_enabled: The server runs with ``--api-keys``.
        rejected: A key was given and refused (shown as "that key was not accepted").
    """

    principal: Principal | None
    keys_enabled: bool
    rejected: bool = False

    @property
    def label(self) -> str:
        """The key's name (never the key), or ``local`` on a server without keys."""
        return self.principal.name if self.principal else ""


def viewer(request: Request) -> Viewer:
    """Authenticate a console request by its Authorization header or its cookie."""
    keys = app_state(request).keys
    if keys is None:
        return Viewer(Principal(None), keys_enabled=False)
    header = request.headers.get("authorization")
    if not header:
        cookie = (request.cookies.get(COOKIE) or "").strip()
        if not cookie:
            return Viewer(None, keys_enabled=True)
        header = f"Bearer {cookie}"
    try:
        return Viewer(keys.authenticate(header), keys_enabled=True)
    except AuthError:
        return Viewer(None, keys_enabled=True, rejected=True)
