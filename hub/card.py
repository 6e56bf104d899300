"""May a model card be published? The one rule ``hub push`` and modelcards share (PyYAML only).

A card may be published only when its YAML metadata says ``draft: false`` (what
`modelcards.card.write_card` writes once nothing is left to complete), its tags do not include
``draft`` and its "To complete before publishing" section lists no item. Everything else is a
draft: a missing file, unreadable front matter, ``draft: true``, and a card without the key (a
hand-written or PEFT template card: the hub publishes only what was checked).

The rule lives in hub because it is shared vocabulary: ``hub push`` applies it, and modelcards
writes cards that satisfy it (`modelcards.draft` re-exports it). To publish, fill the missing
recipe fields and regenerate the card (``loradock card``); editing the README by hand also works
if the flag, the tag and the listed items are all updated.

Where the job ends: this module reads a README; writing cards is `modelcards.card`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DRAFT_KEY = "draft"
DRAFT_TAG = "draft"
TO_COMPLETE_HEADING = "To complete before publishing"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)


def read_front_matter(text: str) -> dict[str, Any] | None:
    """Parse a card's YAML front matter; ``{}`` when there is none, None when it is malformed."""
    import yaml

    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    if data is None:
        return {}
    return data if isinstance(data, dict) else None


def draft_items(text: str) -> list[str]:
    """The bullet items under the "To complete before publishing" heading."""
    items: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("#"):
            inside = line.lstrip("#").strip().lower() == TO_COMPLETE_HEADING.lower()
            continue
        if inside and re.match(r"\s*[-*]\s+\S", line):
            items.append(re.sub(r"^\s*[-*]\s+", "", line).strip())
    return items


def draft_reasons(readme_path: Path) -> list[str]:
    """Why the card at ``readme_path`` is a draft (empty when it may be published)."""
    path = Path(readme_path)
    if not path.is_file():
        return [f"{path} does not exist"]
    text = path.read_text(encoding="utf-8", errors="replace")
    meta = read_front_matter(text)
    if meta is None:
        return ["the YAML metadata cannot be parsed"]
    reasons = []
    flag = meta.get(DRAFT_KEY)
    if flag is not False:
        reasons.append(
            "metadata draft is true" if flag else "metadata has no 'draft: false' (not checked)"
        )
    tags = meta.get("tags") or []
    if isinstance(tags, list) and DRAFT_TAG in tags:
        reasons.append(f"tags include {DRAFT_TAG!r}")
    reasons += [f"to complete: {item}" for item in draft_items(text)]
    return reasons


def card_is_draft(readme_path: Path) -> bool:
    """True when the card may not be published (a missing card counts as a draft)."""
    return bool(draft_reasons(readme_path))
