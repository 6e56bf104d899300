"""Model cards (issue 4): README.md with metadata, run facts and EU AI Act notes.

``write_card`` builds the card from an adapter folder; ``card_is_draft`` tells ``hub push``
whether a README may be published (it needs only PyYAML). Modules: `fields` (recipe card
fields), `facts` (reading the folder), `euaiact` (computed notes), `card` (rendering with
``card.md.jinja``), `draft` (draft detection).
"""

from modelcards.card import CardResult, write_card
from modelcards.draft import card_is_draft, draft_reasons

__all__ = ["CardResult", "card_is_draft", "draft_reasons", "write_card"]
