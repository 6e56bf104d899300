"""Is a model card a draft? The rule lives in `hub.card` (``hub push`` applies it), re-exported.

modelcards writes cards that satisfy it (`modelcards.card` uses the key, the tag and the heading
below), so both stages read one rule. See `hub.card` for what makes a card publishable.

Where the job ends: this module only re-exports; writing cards is `modelcards.card`.
"""

from __future__ import annotations

from hub.card import (
    DRAFT_KEY,
    DRAFT_TAG,
    TO_COMPLETE_HEADING,
    card_is_draft,
    draft_items,
    draft_reasons,
    read_front_matter,
)

__all__ = [
    "DRAFT_KEY",
    "DRAFT_TAG",
    "TO_COMPLETE_HEADING",
    "card_is_draft",
    "draft_items",
    "draft_reasons",
    "read_front_matter",
]
