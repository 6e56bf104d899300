"""``/docs`` (Swagger UI) and ``/openapi.json``, under the same API-key rule as the API.

The Swagger UI files are served from the ``fastapi-offline`` package (which vendors Swagger UI,
Apache-2.0, and ReDoc, MIT), so the page fetches nothing from a CDN. On a server with
``--api-keys`` the schema is given only to a valid key (Authorization header, or the console's
cookie for a browser), and ``/docs`` without one shows the console's key page; the schema
declares Bearer auth so Swagger's "Authorize" button sends the key with "Try it out".

Where the job ends: publishing the schema FastAPI builds; it adds nothing to the API itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from serve.http.errors import AuthError
from serve.ui.access import viewer

VENDOR_PREFIX = "/ui/vendor"


def vendor_dir() -> Path:
    """The folder of ``fastapi-offline``'s vendored Swagger UI files."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def _schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = app.openapi()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["apiKey"] = {
            "type": "http", "scheme": "bearer",
            "description": "A key from the server's --api-keys file (any value works on a "
                           "server started without --api-keys).",
        }
        schema["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def install_docs(app: FastAPI, key_page: Any) -> None:
    """Add ``/openapi.json``, ``/docs`` and the vendored files to ``app``.

    Args:
        app: The server's app.
        key_page: ``key_page(request, next_path) -> HTMLResponse``, shown to a browser that
            has no valid key on a server with keys.
    """
    app.mount(VENDOR_PREFIX, StaticFiles(directory=vendor_dir()), name="ui-vendor")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(request: Request) -> JSONResponse:
        who = viewer(request)
        if who.principal is None:
            raise AuthError("Missing API key" if not who.rejected else "Incorrect API key provided",
                            fix="Send 'Authorization: Bearer <key>' (a key of --api-keys).")
        return JSONResponse(_schema(app))

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        if viewer(request).principal is None:
            return key_page(request, "/docs")
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="loradock API",
            swagger_js_url=f"{VENDOR_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR_PREFIX}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )
