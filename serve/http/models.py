"""``GET /v1/models`` and ``GET /v1/models/{model}``: what this caller may use, OpenAI list shape.

The base is listed as ``BASE``; every adapter registered against it as ``BASE+NAME`` (its latest
version) with ``version``, ``versions`` and ``parent`` (the lineage parent ``BASE+NAME@V`` when
it was trained from another adapter, else the base). A key restricted to some versions sees
``BASE+NAME@V`` for the newest version it may use. The list is read from the store per request, so
a version registered a moment ago shows at once.

Where the job ends: listing. Resolving a model for generation is `serve.http.generation`.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
from collections import defaultdict

from fastapi import APIRouter, Depends, Request

from hub.store import AdapterRecord
from serve.http.auth import Principal
from serve.http.generation import resolve_model
from serve.http.protocol import ModelCard, ModelList
from serve.http.state import AppState, app_state, caller

router = APIRouter()


def _epoch(timestamp: str, default: int) -> int:
    try:
        return int(_dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")
                   .replace(tzinfo=_dt.UTC).timestamp())
    except (TypeError, ValueError):
        return default


def base_card(state: AppState) -> ModelCard:
    """The base model's entry."""
    return ModelCard(id=state.base.name, created=state.started_at, root=state.base.name,
                     max_model_len=state.max_model_len)


def adapter_card(
    state: AppState, principal: Principal, record: AdapterRecord, model_id: str,
    versions: list[int],
) -> ModelCard:
    """One adapter's entry; the lineage parent is shown only if the caller may see it."""
    base = state.base.name
    parent = base
    if record.parent:
        name, _, version = record.parent.partition("@")
        if version.isdigit() and principal.may_use(name, int(version)):
            parent = f"{base}+{record.parent}"
    return ModelCard(
        id=model_id, created=_epoch(record.created_at, state.started_at), root=base,
        parent=parent, version=record.version, versions=versions,
        max_model_len=state.max_model_len,
    )


def visible_cards(state: AppState, principal: Principal) -> list[ModelCard]:
    """Every model the caller may use (reads the store)."""
    by_name: dict[str, list[AdapterRecord]] = defaultdict(list)
    for record in state.store.list():
        if record.base == state.base.name:
            by_name[record.name].append(record)
    cards = [base_card(state)] if principal.may_use_base() else []
    for name in sorted(by_name):
        records = sorted(by_name[name], key=lambda r: r.version)
        visible = [r for r in records if principal.may_use(name, r.version)]
        if not visible:
            continue
        newest = visible[-1]
        pinned = newest.version != records[-1].version
        model_id = f"{state.base.name}+{name}" + (f"@{newest.version}" if pinned else "")
        cards.append(adapter_card(state, principal, newest, model_id,
                                  [r.version for r in visible]))
    return cards


@router.get("/v1/models")
async def list_models(request: Request, principal: Principal = Depends(caller)) -> dict:  # noqa: B008
    """The base and every adapter this caller may use."""
    state = app_state(request)
    cards = await asyncio.to_thread(visible_cards, state, principal)
    return ModelList(data=cards).model_dump(mode="json")


@router.get("/v1/models/{model:path}")
async def get_model(
    model: str, request: Request, principal: Principal = Depends(caller)  # noqa: B008
) -> dict:
    """One model, resolved exactly as a generation request would resolve it."""
    state = app_state(request)
    resolved = await resolve_model(state, principal, model)
    if resolved.adapter is None:
        return base_card(state).model_dump(mode="json")
    record = resolved.adapter
    card = adapter_card(state, principal, record, model, [record.version])
    return card.model_dump(mode="json")
