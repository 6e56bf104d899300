"""Structural checks on canonical rows: known roles, role order, empty text, identical pairs.

Every format is checked the same way, after `train.data.formats` built the canonical row. Turns
are numbered from 1 in messages. A failed check raises `train.data.formats.RowError` with the
first problem found; the row is then dropped under that reason.

Rules for a chat (SFT) conversation: roles are system, user or assistant; a system turn may only
come first; then user and assistant alternate starting with user; the last turn is the
assistant's (a trailing user turn would have nothing to learn from). A preference prompt
follows the same rules but ends with a user turn, and chosen/rejected are one assistant turn each.

Where the job ends: these checks look at one row at a time; duplicates are `train.data.dedup`,
personal data `train.data.pii`, token lengths `train.data.lengths`.
"""

from __future__ import annotations

from typing import Any

from train.data.formats import RowError

ROLES = ("system", "user", "assistant")


def _check_roles(turns: list[dict[str, str]], where: str) -> None:
    for number, turn in enumerate(turns, start=1):
        if turn["role"] not in ROLES:
            raise RowError(
                "role_order",
                f"{where} turn {number} has unknown role {turn['role']!r} "
                f"(expected {', '.join(ROLES)})",
            )


def _check_empty(turns: list[dict[str, str]], where: str) -> None:
    for number, turn in enumerate(turns, start=1):
        if not turn["content"].strip():
            raise RowError("empty_field", f"{where} turn {number} ({turn['role']}) is empty")


def _check_order(turns: list[dict[str, str]], where: str, *, last: str) -> None:
    """Check system-first, user/assistant alternation starting with user, and the last role."""
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    offset = len(turns) - len(body)
    if not body:
        raise RowError("role_order", f"{where} has no user turn")
    for index, turn in enumerate(body):
        number = index + offset + 1
        if turn["role"] == "system":
            raise RowError(
                "role_order", f"{where} turn {number} is a system turn; only the first may be"
            )
        if index == 0 and turn["role"] != "user":
            raise RowError(
                "role_order",
                f"{where} turn {number} is {turn['role']}; "
                "the conversation must start with a user turn",
            )
        if index > 0 and turn["role"] == body[index - 1]["role"]:
            raise RowError(
                "role_order",
                f"{where} turns {number - 1} and {number} are both {turn['role']}",
            )
    if body[-1]["role"] != last:
        if last == "assistant" and all(t["role"] != "assistant" for t in body):
            raise RowError("role_order", f"{where} has no assistant turn")
        raise RowError(
            "role_order",
            f"{where} ends with a {body[-1]['role']} turn, expected {last}",
        )


def check_sft(row: dict[str, Any]) -> None:
    """Check a canonical SFT row.

    Raises:
        RowError: ``role_order`` or ``empty_field``.
    """
    turns = row["messages"]
    if not turns:
        raise RowError("empty_field", "messages is an empty list")
    _check_roles(turns, "messages")
    _check_empty(turns, "messages")
    _check_order(turns, "messages", last="assistant")


def _check_answer(turns: list[dict[str, str]], where: str) -> None:
    if len(turns) != 1:
        raise RowError(
            "role_order", f"{where} must be exactly one assistant turn, got {len(turns)} turns"
        )
    if turns[0]["role"] != "assistant":
        raise RowError("role_order", f"{where} turn is {turns[0]['role']!r}, expected assistant")
    _check_empty(turns, where)


def check_preference(row: dict[str, Any]) -> None:
    """Check a canonical preference row.

    Raises:
        RowError: ``role_order``, ``empty_field`` or ``identical_pair``.
    """
    if not row["prompt"]:
        raise RowError("empty_field", "prompt is an empty list")
    _check_roles(row["prompt"], "prompt")
    _check_empty(row["prompt"], "prompt")
    _check_order(row["prompt"], "prompt", last="user")
    _check_answer(row["chosen"], "chosen")
    _check_answer(row["rejected"], "rejected")
    if row["chosen"][0]["content"].strip() == row["rejected"][0]["content"].strip():
        raise RowError("identical_pair", "chosen and rejected are the same text")


CHECKS = {"sft": check_sft, "preference": check_preference}


def check_row(kind: str, row: dict[str, Any]) -> None:
    """Run the checks for ``kind`` (``sft`` or ``preference``) on a canonical row."""
    CHECKS[kind](row)


def row_turns(row: dict[str, Any]) -> list[dict[str, str]]:
    """All turns of a canonical row in order (preference: prompt, chosen, rejected)."""
    if "messages" in row:
        return row["messages"]
    return [*row["prompt"], *row["chosen"], *row["rejected"]]
