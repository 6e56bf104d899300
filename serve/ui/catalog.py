"""What the console shows about the hub: one row per adapter the caller may see, and its versions.

Visibility is `/v1/models`'s own rule (`serve.http.models.visible_cards`): the served base when
the key may use it, and each adapter of that base with the versions the key may use. The rest of
a row comes from the store's records and from each version's files (size, card state, verdict),
read once per version: a registered version's folder is immutable, so those facts are cached by
the version's content digest.

Where the job ends: facts as plain data. HTML is the templates'; Markdown is `serve.ui.cards`.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.manifest import CARD_FILE, EVAL_JSON_FILE
from hub.remote import card_is_draft
from hub.store import AdapterRecord
from serve.http.auth import Principal
from serve.http.models import visible_cards
from serve.http.state import AppState

LOSS_PNG = "loss.png"


@dataclass(frozen=True)
class VersionFacts:
    """Facts read from one version's files (cached; the folder never changes).

    Attributes:
        size_bytes: Bytes of all its files.
        card: ``"draft"``, ``"ready"`` (complete card: ``hub push`` accepts it) or ``"none"``.
        verdict: ``"pass"``, ``"fail"`` or ``"none"`` (no eval.json).
        verdict_sentence: The evaluation's verdict in one sentence.
        has_loss_png: The folder holds ``loss.png``.
    """

    size_bytes: int
    card: str
    verdict: str
    verdict_sentence: str
    has_loss_png: bool


@dataclass
class AdapterRow:
    """One adapter in the hub browser (its newest version the caller may use).

    Attributes:
        name: Adapter name.
        model: The id apps send (``BASE+NAME``, or ``BASE+NAME@V`` when pinned by the key).
        record: The newest visible version's record.
        versions: Visible version numbers, oldest first.
        parent: Lineage parent as `/v1/models` shows it (the base, or ``BASE+NAME@V``).
        facts: Facts of the newest visible version.
        resident: Resident versions (``NAME@V``) and the load time in seconds when known.
    """

    name: str
    model: str
    record: AdapterRecord
    versions: list[int]
    parent: str
    facts: VersionFacts
    resident: dict[str, float | None] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """``sft``, ``dpo``... from the manifest (``lora`` when there is none)."""
        return self.record.manifest.method if self.record.manifest else "lora"

    def search_text(self) -> str:
        """Lower-case text the search box matches."""
        caps = self.record.capabilities
        parts = [self.name, self.model, self.method, self.parent, " ".join(caps.target_modules),
                 self.facts.card, self.facts.verdict, self.record.created_at]
        return " ".join(parts).lower()


@dataclass
class Hub:
    """What the hub page lists for one caller."""

    base: str
    base_visible: bool
    rows: list[AdapterRow]
    resident_hidden: int = 0


def _facts_key(record: AdapterRecord) -> tuple[str, str]:
    return str(record.path), record.digest


@functools.lru_cache(maxsize=4096)
def _facts_cached(path: str, _digest: str) -> VersionFacts:
    folder = Path(path)
    size = sum(child.stat().st_size for child in folder.rglob("*") if child.is_file())
    readme = folder / CARD_FILE
    card = "none" if not readme.is_file() else ("draft" if card_is_draft(readme) else "ready")
    verdict, sentence = "none", "Not evaluated (no eval.json)."
    doc = read_eval(folder)
    if doc is not None:
        result = doc.get("verdict") or {}
        verdict = "pass" if result.get("passed") else "fail"
        sentence = str(result.get("sentence") or "")
    return VersionFacts(size, card, verdict, sentence, (folder / LOSS_PNG).is_file())


def version_facts(record: AdapterRecord) -> VersionFacts:
    """The cached `VersionFacts` of ``record``."""
    return _facts_cached(*_facts_key(record))


def warm_facts(state: AppState) -> int:
    """Read the facts of every version of the served base now (fills the cache); the count.

    Errors are left for the page that needs the facts to report (a version removed meanwhile,
    an unreadable index): warming is only a head start.
    """
    try:
        records = [r for r in state.store.list() if r.base == state.base.name]
        for record in records:
            version_facts(record)
    except Exception:  # noqa: BLE001 - see above
        return 0
    return len(records)


def read_eval(folder: Path) -> dict[str, Any] | None:
    """``eval.json`` of a version folder, or None when absent or unreadable."""
    path = Path(folder) / EVAL_JSON_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def resident_versions(state: AppState, load_times: dict[str, float]) -> dict[str, float | None]:
    """Resident ``NAME@V`` keys and their load times (None when this process did not see it)."""
    return {key: load_times.get(key) for key in state.engine.health().resident_adapters}


def build_hub(state: AppState, principal: Principal,
              load_times: dict[str, float] | None = None) -> Hub:
    """Every base and adapter the caller may see, with the facts the hub page shows."""
    cards = visible_cards(state, principal)
    base = state.base.name
    records: dict[tuple[str, int], AdapterRecord] = {}
    for record in state.store.list():
        if record.base == base:
            records[(record.name, record.version)] = record
    resident = resident_versions(state, load_times or {})
    by_name: dict[str, dict[str, float | None]] = defaultdict(dict)
    for key, seconds in resident.items():
        by_name[key.partition("@")[0]][key] = seconds
    rows: list[AdapterRow] = []
    shown_resident = 0
    for card in cards:
        if card.version is None:
            continue
        name = card.id.partition("+")[2].partition("@")[0]
        record = records.get((name, card.version))
        if record is None:  # removed between the two reads
            continue
        visible = {f"{name}@{v}" for v in card.versions or []}
        mine = {k: s for k, s in by_name.get(name, {}).items() if k in visible}
        shown_resident += len(mine)
        rows.append(AdapterRow(name=name, model=card.id, record=record,
                               versions=list(card.versions or []), parent=card.parent or base,
                               facts=version_facts(record), resident=mine))
    return Hub(base=base, base_visible=any(c.version is None for c in cards), rows=rows,
               resident_hidden=len(resident) - shown_resident)


def visible_version(state: AppState, principal: Principal, name: str,
                    version: int) -> tuple[AdapterRecord, list[AdapterRecord]] | None:
    """``name@version`` and every version of ``name`` the caller may see; None when hidden.

    A version the caller may not use is reported exactly like a missing one.
    """
    records = [r for r in state.store.list(name) if r.base == state.base.name]
    visible = [r for r in records if principal.may_use(r.name, r.version)]
    chosen = next((r for r in visible if r.version == version), None)
    if chosen is None:
        return None
    return chosen, visible


def human_size(size: int) -> str:
    """``1.2 MB`` style sizes (powers of 1000, as file managers show them)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"
