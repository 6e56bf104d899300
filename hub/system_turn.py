"""Where a system turn goes when a chat template refuses one (Gemma 2): one rule for all stages.

Gemma 2's template raises "System role not supported". Training (`train.template`) and the
server (`serve.chat`) both meet such a turn, from the recipe's ``system_prompt`` or from the
conversation itself; both must render the same prompt, byte for byte (train/serve template
mismatch is the commonest "garbage output" report). So the rule lives here, once: the system
text goes before the first user message with a blank line between, which is what Gemma 3's own
template does with a system turn.

Where the job ends: this module moves text between messages. Deciding that the template refuses
the system turn is the caller's (each renders with its own Jinja setup).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def starts_with_system(messages: Sequence[dict[str, Any]]) -> bool:
    """True if the first message is a system turn."""
    return bool(messages) and messages[0].get("role") == "system"


def fold_system_turn(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold a leading system turn into the first user message, a blank line after its text.

    Messages without a leading system turn, or without a user message to fold it into, come
    back unchanged (copied).
    """
    rows = [dict(m) for m in messages]
    if not starts_with_system(rows):
        return rows
    system, rest = rows[0].get("content") or "", rows[1:]
    for row in rest:
        if row.get("role") == "user":
            row["content"] = f"{system}\n\n{row.get('content') or ''}" if system else row["content"]
            return rest
    return rows


__all__ = ["fold_system_turn", "starts_with_system"]
