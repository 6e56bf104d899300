"""The web console served by ``loradock serve`` at ``/`` (``--no-ui`` turns it off).

Pages: the hub browser (``/``), an adapter version (``/ui/adapters/NAME/V/``), the playground
(``/ui/playground``) and the server figures (``/ui/server``); plus ``/docs`` and
``/openapi.json``, which stay on with ``--no-ui``. Templates and static files live beside this
module; nothing is fetched from another host at run time.

`install_console(app)` adds the pages; `install_api_docs(app)` adds the OpenAPI docs.

Where the job ends: presentation. The console reads the store and the engine's health and calls
the same public routes as apps; it adds no route that generates text or changes state.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


@functools.lru_cache(maxsize=1)
def asset_version() -> str:
    """A digest of the static files: pages link ``console.css?v=...``, so they can be cached."""
    digest = hashlib.sha256()
    for path in sorted(STATIC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


class _CachedStatic(StaticFiles):
    """Static files a browser keeps for a day (a changed file gets a new ``?v=`` link)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "public, max-age=86400"
        return response


def _mount_static(app: FastAPI) -> None:
    if not any(getattr(r, "name", None) == "ui-static" for r in app.routes):
        app.mount("/ui/static", _CachedStatic(directory=STATIC), name="ui-static")


def install_console(app: FastAPI) -> None:
    """Add the console's pages and static files to ``app``.

    The hub's per-version facts (size, card state, verdict: a YAML parse per card) are read
    once per version and cached; a background thread reads those of the versions already
    registered now, while the engine loads, so the first hub page does not pay for them.
    """
    import threading

    from serve.ui.catalog import warm_facts
    from serve.ui.routes import router

    _mount_static(app)
    app.include_router(router)
    threading.Thread(target=warm_facts, args=(app.state.loradock,), daemon=True,
                     name="console-warm").start()


def install_api_docs(app: FastAPI) -> None:
    """Add ``/docs`` and ``/openapi.json`` (with the API-key rule) to ``app``."""
    from serve.ui.docs import install_docs
    from serve.ui.routes import key_page

    _mount_static(app)  # the key page's stylesheet and script
    install_docs(app, key_page)
