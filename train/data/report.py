"""What a dataset check found: problem reasons, the `DataReport`, and its readable rendering.

`REASONS` is the one table of problem kinds (name, whether the row is dropped, help text); every
other module refers to reasons by these names. `DataReport` is what `check_dataset` and
`prepare_dataset` return and what ``data_report.json`` holds; the trainer copies it into the
manifest and the model card reads it from there.

This module only holds and renders results; finding problems is `train.data.checks`,
`train.data.pii`, `train.data.dedup` and `train.data.lengths`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Reason = Literal[
    "malformed",
    "empty_field",
    "role_order",
    "identical_pair",
    "pii",
    "too_long",
    "exact_duplicate",
    "near_duplicate",
    "same_prompt",
    "too_short",
]
Action = Literal["dropped", "kept", "redacted"]
Kind = Literal["sft", "preference"]
SPLIT_NAMES = ("train", "validation", "test")

REASONS: dict[str, str] = {
    "malformed": "not valid JSON/CSV, not an object, a missing field or a value of the wrong type",
    "empty_field": "a required text field is empty or only whitespace",
    "role_order": "roles out of order: assistant first, two turns of one role in a row, no "
    "assistant turn, an unknown role, or (preference) a prompt not ending with a user turn",
    "identical_pair": "preference row whose chosen and rejected answers are the same",
    "pii": "personal data found (emails, phone numbers, cards, IBANs, IP addresses)",
    "too_long": "longer than max_seq_len tokens with the base tokenizer's chat template",
    "exact_duplicate": "the same row as an earlier kept row (after PII redaction)",
    "near_duplicate": "same text as an earlier row once case, whitespace and punctuation are "
    "ignored, or a MinHash Jaccard similarity of word 3-grams >= 0.8 (system turns left "
    "out); kept, and kept in the same split as its twin",
    "same_prompt": "the same prompt as an earlier row with a different answer; kept, and kept "
    "in the same split",
    "too_short": "an answer (assistant turn; preference: chosen or rejected) shorter than "
    "min_answer_tokens tokens of the base tokenizer",
}


@dataclass(frozen=True)
class Problem:
    """One finding about one row.

    Attributes:
        line: 1-based line in the source (JSONL: the line; CSV: the file line where the record
            starts, header = line 1; JSON list: the item's index + 1).
        reason: One of `REASONS`.
        detail: Human-readable specifics (which field, which line it duplicates, ...).
        action: What happened to the row: ``dropped``, ``kept`` or ``redacted``.
    """

    line: int
    reason: str
    detail: str
    action: Action = "dropped"

    def to_dict(self) -> dict[str, Any]:
        """Return the problem as a JSON-ready dict."""
        return asdict(self)


@dataclass
class DataReport:
    """The result of checking (and possibly preparing) one dataset file.

    Attributes:
        source: Path of the source file as given.
        sha256: Hex sha256 of the source file's bytes.
        format: Input format used (``chat``, ``alpaca``, ``completion``, ``preference``).
        kind: ``sft`` (rows are ``{"messages", "line"}``) or ``preference`` (``{"prompt",
            "chosen", "rejected", "line"}``).
        file_type: How the file was read (``jsonl``, ``json``, ``csv``, ``tsv``).
        rows_in: Rows read from the file, malformed ones included (blank JSONL lines excluded).
        rows_kept: Rows that survived every check (the sum of ``splits`` after prepare).
        splits: ``{"train", "validation", "test"}`` row counts (zeros from `check_dataset`).
        dropped: ``{reason: count}`` of dropped rows.
        dropped_lines: ``{reason: [line, ...]}`` of dropped rows.
        problems: Every finding, in line order (dropped rows and kept-but-noted rows).
        pii: ``{kind: count}`` of PII findings (occurrences), whatever the policy.
        pii_lines: ``{kind: [line, ...]}`` of rows with that kind of PII.
        pii_policy: ``drop``, ``redact`` or ``keep``.
        max_seq_len: Token limit rows were measured against.
        length_checked: Whether a tokenizer was given (otherwise ``too_long`` was not checked).
        max_tokens: Longest kept row in tokens (0 when not measured).
        total_tokens: Tokens over all kept rows (0 when not measured; preference rows count
            prompt + chosen).
        near_duplicate_groups: Groups of 2+ kept rows that are near twins or share a prompt.
        min_answer_tokens: Shortest answer allowed, in tokens (checked with a tokenizer only).
        origin: Where a Hub dataset came from (``hf://`` source: repo, revision, commit sha,
            file), else None.
        seed: Split seed (prepare only).
        split_fractions: Requested train/validation/test fractions (prepare only).
        notes: Warnings about the whole file (e.g. too few rows for a test split).
    """

    source: str
    sha256: str
    format: str
    kind: Kind
    file_type: str
    rows_in: int = 0
    rows_kept: int = 0
    splits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLIT_NAMES, 0))
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_lines: dict[str, list[int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    pii: dict[str, int] = field(default_factory=dict)
    pii_lines: dict[str, list[int]] = field(default_factory=dict)
    pii_policy: str = "redact"
    max_seq_len: int = 1024
    length_checked: bool = False
    max_tokens: int = 0
    total_tokens: int = 0
    near_duplicate_groups: int = 0
    min_answer_tokens: int = 1
    origin: dict[str, Any] | None = None
    seed: int | None = None
    split_fractions: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        """Record a finding (and, when the row is dropped, count it under its reason)."""
        self.problems.append(problem)
        if problem.action == "dropped":
            self.dropped[problem.reason] = self.dropped.get(problem.reason, 0) + 1
            self.dropped_lines.setdefault(problem.reason, []).append(problem.line)

    def add_pii(self, kind: str, line: int, count: int) -> None:
        """Record ``count`` findings of PII ``kind`` on ``line``."""
        self.pii[kind] = self.pii.get(kind, 0) + count
        lines = self.pii_lines.setdefault(kind, [])
        if line not in lines:
            lines.append(line)

    @property
    def ok(self) -> bool:
        """True when at least one row is usable."""
        return self.rows_kept > 0

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (``data_report.json``)."""
        data = asdict(self)
        data["problems"] = [p.to_dict() for p in sorted(self.problems, key=_problem_key)]
        data["dropped_lines"] = {k: sorted(v) for k, v in sorted(self.dropped_lines.items())}
        data["pii_lines"] = {k: sorted(v) for k, v in sorted(self.pii_lines.items())}
        data["dropped"] = dict(sorted(self.dropped.items()))
        data["pii"] = dict(sorted(self.pii.items()))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        """Rebuild a report from `to_dict` output (e.g. a ``data_report.json``)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["problems"] = [Problem(**p) for p in data.get("problems", [])]
        return cls(**known)

    def render(self, max_problems: int = 20) -> str:
        """Return a readable report: counts first, then the first problems with line numbers."""
        out = [
            f"{self.source}  ({self.file_type}, format {self.format}, {self.kind})",
            f"sha256 {self.sha256}",
            f"rows: {self.rows_in} read, {self.rows_kept} usable, "
            f"{self.rows_in - self.rows_kept} dropped",
        ]
        if any(self.splits.values()):
            out.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        if self.dropped:
            out.append("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
        if self.pii:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.pii.items()))
            out.append(f"pii (policy {self.pii_policy}): {kinds}")
        if self.near_duplicate_groups:
            out.append(f"near-duplicate groups kept together: {self.near_duplicate_groups}")
        if self.length_checked:
            out.append(f"tokens: longest {self.max_tokens} (limit {self.max_seq_len})")
        else:
            out.append("tokens: not measured (no tokenizer)")
        out.extend(f"note: {n}" for n in self.notes)
        problems = sorted(self.problems, key=_problem_key)
        if problems:
            out.append(f"problems ({len(problems)}):")
            for p in problems[:max_problems]:
                out.append(f"  line {p.line}: {p.reason} ({p.action}): {p.detail}")
            if len(problems) > max_problems:
                out.append(f"  ... {len(problems) - max_problems} more (use --json for all)")
        else:
            out.append("problems: none")
        return "\n".join(out)


def _problem_key(problem: Problem) -> tuple[int, str]:
    return (problem.line, problem.reason)
