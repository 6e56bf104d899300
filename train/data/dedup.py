"""Duplicates among canonical rows, and the groups of rows the split must keep together.

- **Exact duplicate**: the same canonical row (roles and texts, byte for byte, after PII
  redaction) as an earlier row. The later row is dropped, naming the line it repeats.
- **Near duplicate**: the row's text (`near_text`: every non-system turn, `normalise`-d: case,
  whitespace and punctuation ignored) is the same as an earlier row's, or their MinHash estimate
  of the Jaccard similarity of word 3-gram shingles is at least `NEAR_THRESHOLD` (words as
  ROUGE-L counts them, `train.eval.metrics.word_tokens`: a CJK character is one word)
  (datasketch ``MinHashLSH`` finds the candidates; `NUM_PERM` permutations, a fixed seed). System
  turns are left out because datasets repeat one system prompt on every row.
- **Same prompt, different answer**: rows whose prompt (every turn before the last assistant
  turn, or a preference row's prompt, normalised) is the same but whose answers differ.

Near duplicates and same-prompt rows are kept, reported with the line of the earlier row, and
joined (union-find) into one group; `train.data.split` never divides a group, so no test row
has a near twin, or the same question, in train.

Where the job ends: this module compares rows; it does not decide split sizes.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from train.data.checks import row_turns

NEAR_THRESHOLD = 0.8
NUM_PERM = 128
SHINGLE = 3
_SEED = 1
_SPACE = re.compile(r"\s+")

Relation = Literal["exact", "near", "same_prompt"]


def normalise(text: str) -> str:
    """Case-fold, drop punctuation and symbols, and collapse whitespace."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in folded)
    return _SPACE.sub(" ", kept).strip()


def exact_key(row: dict[str, Any]) -> str:
    """The row's identity for exact duplicates (its fields without ``line``)."""
    return json.dumps({k: v for k, v in row.items() if k != "line"}, ensure_ascii=False)


def near_key(row: dict[str, Any]) -> str:
    """The row's identity for normalised duplicates (roles and normalised texts)."""
    return "\x1e".join(f"{t['role']}\x1f{normalise(t['content'])}" for t in row_turns(row))


def near_text(row: dict[str, Any]) -> str:
    """The text MinHash compares: the non-system turns, normalised, one per line."""
    return "\n".join(normalise(t["content"]) for t in row_turns(row) if t["role"] != "system")


def prompt_key(row: dict[str, Any]) -> str:
    """The row's prompt, normalised: what the model is asked (the answer left out)."""
    if "messages" in row:
        turns = row["messages"]
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        turns = turns[:last]
    else:
        turns = row["prompt"]
    return "\x1e".join(f"{t['role']}\x1f{normalise(t['content'])}" for t in turns)


def shingles(text: str, size: int = SHINGLE) -> set[str]:
    """Word ``size``-grams of ``text`` (all its words as one shingle when there are fewer)."""
    from train.eval.metrics import word_tokens

    words = word_tokens(text)
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


@dataclass(frozen=True)
class Duplicate:
    """Row ``index`` repeats, nearly repeats, or asks the same as the row at ``twin``.

    Attributes:
        index: The later row.
        twin: The earlier row it is related to.
        relation: ``exact`` (dropped), ``near`` or ``same_prompt`` (kept, same group).
        similarity: The MinHash Jaccard estimate for a ``near`` pair (1.0 when the normalised
            texts are equal), else None.
    """

    index: int
    twin: int
    relation: Relation
    similarity: float | None = None

    @property
    def exact(self) -> bool:
        """True for an exact duplicate (the row is dropped)."""
        return self.relation == "exact"


class _Groups:
    """Union-find over row indices; the smallest index is each group's root."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def add(self, i: int) -> None:
        self.parent[i] = i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in sorted(self.parent):
            out.setdefault(self.find(i), []).append(i)
        return sorted(out.values(), key=lambda g: g[0])


def _minhash(text: str) -> Any:
    from datasketch import MinHash

    mh = MinHash(num_perm=NUM_PERM, seed=_SEED)
    mh.update_batch([s.encode("utf-8") for s in shingles(text)])
    return mh


def find_duplicates(
    rows: list[dict[str, Any]], *, threshold: float = NEAR_THRESHOLD
) -> tuple[list[Duplicate], list[list[int]]]:
    """Find duplicates and group near twins and same-prompt rows.

    Args:
        rows: Canonical rows in file order.
        threshold: MinHash Jaccard similarity from which two rows are near duplicates.

    Returns:
        The duplicates found (each pointing at the earliest related row) and the groups of row
        indices that must share a split. Exact duplicates are in no group (they are dropped);
        every other row is in exactly one group; groups and their members are in file order.
    """
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    first_exact: dict[str, int] = {}
    first_near: dict[str, int] = {}
    first_prompt: dict[str, int] = {}
    hashes: dict[int, Any] = {}
    duplicates: list[Duplicate] = []
    groups = _Groups()
    for index, row in enumerate(rows):
        key = exact_key(row)
        if key in first_exact:
            duplicates.append(Duplicate(index, first_exact[key], "exact"))
            continue
        first_exact[key] = index
        groups.add(index)
        near = near_key(row)
        prompt = prompt_key(row)
        if near in first_near:
            twin = first_near[near]
            duplicates.append(Duplicate(index, twin, "near", 1.0))
            groups.union(index, twin)
        else:
            first_near[near] = index
            mh = _minhash(near_text(row))
            candidates = sorted(lsh.query(mh))
            scored = [(c, mh.jaccard(hashes[c])) for c in candidates]
            similar = [(c, j) for c, j in scored if j >= threshold]
            for twin, _ in similar:
                groups.union(index, twin)
            if similar:
                twin, jaccard = similar[0]
                duplicates.append(Duplicate(index, twin, "near", round(jaccard, 3)))
            elif prompt in first_prompt:
                duplicates.append(Duplicate(index, first_prompt[prompt], "same_prompt"))
            hashes[index] = mh
            lsh.insert(index, mh)
        if prompt in first_prompt:
            groups.union(index, first_prompt[prompt])
        else:
            first_prompt[prompt] = index
    return duplicates, groups.groups()
