"""Token lengths of canonical rows as the trainer will see them: the base tokenizer's chat template.

A row's length is the number of tokens of its conversation rendered with
``tokenizer.apply_chat_template(..., tokenize=False)`` and tokenised without extra special
tokens (the template already writes them). A preference row's length is the longer of
prompt + chosen and prompt + rejected. Note that some templates add a default system turn when
the row has none (SmolLM2 does); those tokens count, because training sees them too.

An answer's length (`answer_lengths`, for ``min_answer_tokens``) is the number of tokens of its
content alone, without the template: the shortest assistant turn of an SFT row, the shorter of
chosen and rejected for a preference row.

Where the job ends: this module measures; dropping rows over ``max_seq_len`` or under
``min_answer_tokens`` is the pipeline's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub.errors import InvalidInput

_BATCH = 256


def load_tokenizer(base_path: str | Path):
    """Load the base model's tokenizer from its local folder (no download, no remote code).

    Args:
        base_path: A base folder, e.g. ``Store().base("smollm2").path``.

    Raises:
        InvalidInput: If the tokenizer has no chat template.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(base_path), trust_remote_code=False, local_files_only=True
    )
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(
            f"The tokenizer in {base_path} has no chat template",
            fix="Use an instruct base whose tokenizer_config.json or chat_template.jinja "
            "defines one.",
        )
    return tokenizer


def conversations(row: dict[str, Any]) -> list[list[dict[str, str]]]:
    """The full conversations a canonical row stands for (one for SFT, two for preference)."""
    if "messages" in row:
        return [row["messages"]]
    return [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]


def token_lengths(rows: list[dict[str, Any]], tokenizer) -> list[tuple[int, int]]:
    """Measure canonical rows.

    Args:
        rows: Canonical rows (SFT or preference).
        tokenizer: A Hugging Face tokenizer with a chat template.

    Returns:
        For each row, ``(length, counted)``: ``length`` is compared with ``max_seq_len``;
        ``counted`` is what the row adds to the report's token total (the first conversation).
    """
    texts: list[str] = []
    owners: list[int] = []
    for index, row in enumerate(rows):
        for conversation in conversations(row):
            texts.append(tokenizer.apply_chat_template(conversation, tokenize=False))
            owners.append(index)
    counts: list[int] = []
    for start in range(0, len(texts), _BATCH):
        encoded = tokenizer(texts[start : start + _BATCH], add_special_tokens=False)
        counts.extend(len(ids) for ids in encoded["input_ids"])
    result = [(0, 0)] * len(rows)
    seen: set[int] = set()
    for owner, count in zip(owners, counts, strict=True):
        length, counted = result[owner]
        result[owner] = (max(length, count), counted if owner in seen else count)
        seen.add(owner)
    return result


def answers(row: dict[str, Any]) -> list[str]:
    """The answer texts of a canonical row (assistant turns; preference: chosen, rejected)."""
    if "messages" in row:
        return [t["content"] for t in row["messages"] if t["role"] == "assistant"]
    return [row["chosen"][0]["content"], row["rejected"][0]["content"]]


def answer_lengths(rows: list[dict[str, Any]], tokenizer) -> list[int]:
    """The shortest answer of each row in tokens (content only, no special tokens)."""
    texts: list[str] = []
    owners: list[int] = []
    for index, row in enumerate(rows):
        for text in answers(row):
            texts.append(text)
            owners.append(index)
    counts: list[int] = []
    for start in range(0, len(texts), _BATCH):
        encoded = tokenizer(texts[start : start + _BATCH], add_special_tokens=False)
        counts.extend(len(ids) for ids in encoded["input_ids"])
    result: list[int | None] = [None] * len(rows)
    for owner, count in zip(owners, counts, strict=True):
        current = result[owner]
        result[owner] = count if current is None else min(current, count)
    return [r or 0 for r in result]
