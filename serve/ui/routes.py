"""The console's pages: hub (``/``), adapter, playground and server, rendered with Jinja2.

Every page is a GET that reads the store and the engine's health; nothing here changes state.
The playground and server pages render a form or a frame, and their JavaScript talks to the
public API (``/v1/models``, ``/v1/chat/completions``, ``/metrics``) exactly as an app would. On a
server with ``--api-keys`` a page opened without a valid key answers 401 with the key page.

Where the job ends: routing and template context. Facts come from `serve.ui.catalog`, cards
and evaluations from `serve.ui.cards`, the caller from `serve.ui.access`.
"""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from hub.errors import LoradockError
from serve.http.models import visible_cards
from serve.http.state import AppState, app_state
from serve.ui import asset_version
from serve.ui.access import Viewer, viewer
from serve.ui.cards import eval_view, rendered_card
from serve.ui.catalog import (
    LOSS_PNG,
    AdapterRow,
    build_hub,
    human_size,
    resident_versions,
    version_facts,
    visible_version,
)

router = APIRouter(include_in_schema=False)
TEMPLATES = Path(__file__).parent / "templates"
MAX_COLUMNS = 4  # the base and three adapters
PAGE_SIZE = 50  # hub rows a page: 200 rows took Chromium 300-600 ms to lay out on 2 busy cores
DEFAULT_PROMPT = "In one sentence: what is a LoRA adapter?"


@functools.lru_cache(maxsize=1)
def environment() -> Any:
    """The Jinja2 environment (HTML autoescaped; templates compiled once)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(size=human_size, secs=_secs, num=_num, source=_source)
    return env


def _secs(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _source(value: str) -> str:
    """Where a version came from, without local paths (``hf://...`` is shown as is)."""
    return value if value.startswith("hf://") else "local folder"


def load_times(state: AppState) -> dict[str, float]:
    """Seconds each resident ``NAME@V`` took to load, where the server recorded it."""
    return dict(state.metrics.adapter_load_by_key)


def render(request: Request, template: str, who: Viewer, status: int = 200,
           **context: Any) -> HTMLResponse:
    """Render ``template`` with the context every page shares."""
    state = app_state(request)
    html = environment().get_template(template).render(
        who=who, base=state.base.name, engine=state.engine.name, asset_version=asset_version(),
        **context)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def key_page(request: Request, next_path: str) -> HTMLResponse:
    """The "this server needs an API key" page (401)."""
    return render(request, "key.html.jinja", viewer(request), status=401, page="key",
                  next_path=next_path)


def _filter(rows: list[AdapterRow], q: str, method: str, card: str, verdict: str,
            resident: bool) -> list[AdapterRow]:
    words = q.lower().split()
    out = []
    for row in rows:
        text = row.search_text()
        if words and not all(w in text for w in words):
            continue
        if method and row.method != method:
            continue
        if card and row.facts.card != card:
            continue
        if verdict and row.facts.verdict != verdict:
            continue
        if resident and not row.resident:
            continue
        out.append(row)
    return out


@router.get("/", response_class=HTMLResponse)
async def hub_page(
    request: Request, q: str = "", method: str = "", card: str = "", verdict: str = "",
    resident: bool = False, page_no: int = Query(1, ge=1, le=100_000, alias="page"),
) -> HTMLResponse:
    """The hub browser (``PAGE_SIZE`` adapters a page; filters apply to all of them)."""
    who = viewer(request)
    if who.principal is None:
        return key_page(request, "/")
    state = app_state(request)
    hub = await asyncio.to_thread(build_hub, state, who.principal, load_times(state))
    matched = _filter(hub.rows, q, method, card, verdict, resident)
    pages = max(1, -(-len(matched) // PAGE_SIZE))
    page_no = min(page_no, pages)
    rows = matched[(page_no - 1) * PAGE_SIZE: page_no * PAGE_SIZE]
    filters = {k: v for k, v in (("q", q), ("method", method), ("card", card),
                                 ("verdict", verdict), ("resident", "1" if resident else ""))
               if v}
    query = {"q": q, "method": method, "card": card, "verdict": verdict, "resident": resident,
             "active": bool(filters)}

    def page_url(number: int) -> str:
        return "/?" + urlencode({**filters, "page": number})

    paging = {"page": page_no, "pages": pages, "matched": len(matched),
              "first": (page_no - 1) * PAGE_SIZE + 1 if rows else 0,
              "last": (page_no - 1) * PAGE_SIZE + len(rows),
              "prev": page_url(page_no - 1) if page_no > 1 else "",
              "next": page_url(page_no + 1) if page_no < pages else ""}
    return render(
        request, "hub.html.jinja", who, page="hub", hub=hub, rows=rows, query=query,
        paging=paging, base_info=state.base, total=len(hub.rows),
        versions_total=sum(len(r.versions) for r in hub.rows),
        resident_count=sum(len(r.resident) for r in hub.rows),
        passed=sum(r.facts.verdict == "pass" for r in hub.rows),
        ready=sum(r.facts.card == "ready" for r in hub.rows),
        methods=sorted({r.method for r in hub.rows}),
    )


def _missing(request: Request, who: Viewer, name: str, version: int) -> HTMLResponse:
    message = (f"No adapter {name}@{version} that you may use is registered for this "
               "server's base.")
    return render(request, "missing.html.jinja", who, status=404, page="missing",
                  message=message)


def python_snippet(base_url: str, model: str, keys_enabled: bool, prompt: str) -> str:
    """The openai-client lines that call ``model`` on this server."""
    api_key = '"YOUR_API_KEY"' if keys_enabled else '"local"  # any value without --api-keys'
    return (
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{base_url}/v1", api_key={api_key})\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{model}",\n'
        f"    messages=[{{\"role\": \"user\", \"content\": {json.dumps(prompt)}}}],\n"
        ")\n"
        "print(reply.choices[0].message.content)\n"
    )


def _example_prompt(evaluation: Any) -> str:
    for example in (evaluation.worst if evaluation else []):
        if example.get("prompt"):
            return " ".join(str(example["prompt"]).split())[:300]
    return "Hello!"


@router.get("/ui/adapters/{name}/{version}/", response_class=HTMLResponse)
async def adapter_page(request: Request, name: str, version: int) -> HTMLResponse:
    """One version: card, evaluation, versions with checksums, how to call it."""
    who = viewer(request)
    if who.principal is None:
        return key_page(request, request.url.path)
    state = app_state(request)
    try:
        found = await asyncio.to_thread(visible_version, state, who.principal, name, version)
    except LoradockError:  # an unsafe name: the same answer as a missing one
        found = None
    if found is None:
        return _missing(request, who, name, version)
    record, versions = found
    model = record.model  # pinned: this page is about this version
    parent = _parent(state, who, record)
    facts = await asyncio.to_thread(version_facts, record)
    card = await asyncio.to_thread(rendered_card, record.path, record.digest)
    evaluation = await asyncio.to_thread(eval_view, record.path, record.digest)
    base_url = str(request.base_url).rstrip("/")
    resident = {k: s for k, s in resident_versions(state, load_times(state)).items()
                if k == f"{record.name}@{record.version}"}
    return render(
        request, "adapter.html.jinja", who, page="adapter", record=record, versions=versions,
        model=model, parent=parent, facts=facts, card=card, evaluation=evaluation,
        resident=resident,
        snippet=python_snippet(base_url, model, who.keys_enabled, _example_prompt(evaluation)),
        ollama=f"loradock export ollama {record.name}@{record.version} "
               f"--out ollama-{record.name}",
    )


def visible_cards_for(state: AppState, who: Viewer) -> list[Any]:
    """`/v1/models`'s list for this viewer."""
    assert who.principal is not None
    return visible_cards(state, who.principal)


def _parent(state: AppState, who: Viewer, record: Any) -> str:
    from serve.http.models import adapter_card

    assert who.principal is not None
    return adapter_card(state, who.principal, record, record.model, [record.version]).parent


@router.get("/ui/adapters/{name}/{version}/loss.png")
async def loss_png(request: Request, name: str, version: int) -> Response:
    """The training curves image of a version the caller may see."""
    who = viewer(request)
    state = app_state(request)
    found = None
    if who.principal is not None:
        try:
            found = await asyncio.to_thread(visible_version, state, who.principal, name,
                                            version)
        except LoradockError:
            found = None
    path = found[0].path / LOSS_PNG if found else None
    if path is None or not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})


@router.get("/ui/playground", response_class=HTMLResponse)
async def playground_page(
    request: Request, models: str = Query("", max_length=2000),
    prompt: str = Query(DEFAULT_PROMPT, max_length=4000),
    system: str = Query("", max_length=4000),
) -> HTMLResponse:
    """The side-by-side form; its script streams from ``/v1/chat/completions``."""
    who = viewer(request)
    if who.principal is None:
        return key_page(request, "/ui/playground")
    state = app_state(request)
    ids = [c.id for c in await asyncio.to_thread(visible_cards_for, state, who)]
    wanted = [m for m in models.split(",") if m]
    selected = [m for m in wanted if m in ids][:MAX_COLUMNS]
    if not selected and ids:
        selected = ids[:2]
    return render(request, "playground.html.jinja", who, page="playground", models=ids,
                  selected=selected, prompt=prompt, system=system, max_models=MAX_COLUMNS)


@router.get("/ui/server", response_class=HTMLResponse)
async def server_page(request: Request) -> HTMLResponse:
    """Figures from ``/metrics`` at a glance (its script polls ``/metrics``)."""
    who = viewer(request)
    if who.principal is None:
        return key_page(request, "/ui/server")
    return render(request, "server.html.jinja", who, page="server")
