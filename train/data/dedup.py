"""Exact and near duplicates among canonical rows, and the groups the split must keep together.

- Exact duplicate: the same canonical row (roles and texts, byte for byte, after PII redaction)
  as an earlier row. The later row is dropped, naming the line it repeats.
- Near duplicate: the same text as an earlier row once case, whitespace and punctuation are
  ignored (`normalise`). The row is kept, reported with the line of its twin, and put in the same
  group, so `train.data.split` never puts twins in different splits.

Where the job ends: this module compares rows; it does not decide split sizes.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from train.data.checks import row_turns

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case-fold, drop punctuation and symbols, and collapse whitespace."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in folded)
    return _SPACE.sub(" ", kept).strip()


def exact_key(row: dict[str, Any]) -> str:
    """The row's identity for exact duplicates (its fields without ``line``)."""
    return json.dumps({k: v for k, v in row.items() if k != "line"}, ensure_ascii=False)


def near_key(row: dict[str, Any]) -> str:
    """The row's identity for near duplicates (roles and normalised texts)."""
    return "\x1e".join(f"{t['role']}\x1f{normalise(t['content'])}" for t in row_turns(row))


@dataclass(frozen=True)
class Duplicate:
    """Row ``index`` repeats (exactly or nearly) the row at ``twin`` (an index)."""

    index: int
    twin: int
    exact: bool


def find_duplicates(rows: list[dict[str, Any]]) -> tuple[list[Duplicate], list[list[int]]]:
    """Find duplicates and group near twins.

    Args:
        rows: Canonical rows in file order.

    Returns:
        The duplicates found (each pointing at the first row it repeats) and the groups of row
        indices that must share a split. Exact duplicates are in no group (they are dropped);
        every other row is in exactly one group, in file order.
    """
    first_exact: dict[str, int] = {}
    first_near: dict[str, int] = {}
    duplicates: list[Duplicate] = []
    groups: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        key = exact_key(row)
        if key in first_exact:
            duplicates.append(Duplicate(index, first_exact[key], exact=True))
            continue
        first_exact[key] = index
        near = near_key(row)
        if near in first_near:
            twin = first_near[near]
            duplicates.append(Duplicate(index, twin, exact=False))
            groups[twin].append(index)
            continue
        first_near[near] = index
        groups[index] = [index]
    return duplicates, list(groups.values())
