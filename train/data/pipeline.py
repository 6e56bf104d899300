"""Check and prepare a dataset file: read, normalise, check, handle PII, measure, dedup, split.

`check_dataset` reports; `prepare_dataset` also writes the three splits and ``data_report.json``
atomically into one folder. Order of work on each row: read (`loaders`) -> canonical row
(`formats`) -> structure (`checks`) -> personal data (`pii`, policy drop/redact/keep) -> token
length and answer length (`lengths`, when a tokenizer is given) -> duplicates (`dedup`, on the
redacted text) -> split (`split`). Every dropped row is reported once, under the first reason
found. A file with no usable row raises `NoUsableRows` (an `InvalidInput` carrying the report).

Where the job ends: this module runs the steps and writes files; each step's rules live in its
own module, and the tokenizer is chosen and loaded by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hub.errors import InvalidInput
from hub.files import atomic_dir, sha256_file
from train.data.checks import check_row
from train.data.dedup import find_duplicates
from train.data.formats import Format, RowError, detect_format
from train.data.lengths import answer_lengths, token_lengths
from train.data.loaders import RawRow, read_rows
from train.data.pii import PII_POLICIES, PiiPolicy, find_pii, redact
from train.data.report import SPLIT_NAMES, DataReport, Problem
from train.data.split import check_fractions, split_groups

REPORT_FILE = "data_report.json"
SPLIT_FILES = {name: f"{name}.jsonl" for name in SPLIT_NAMES}
_PII_ACTIONS = {"drop": "dropped", "redact": "redacted", "keep": "kept"}


class NoUsableRows(InvalidInput):
    """A dataset file has no usable row; ``report`` says why for every line."""

    def __init__(self, report: DataReport) -> None:
        self.report = report
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())) or "no rows"
        super().__init__(
            f"Dataset {report.source} has no usable row ({report.rows_in} read; dropped: "
            f"{reasons})",
            fix="Run `loradock data check FILE` to see each problem with its line number.",
            param="FILE",
        )


def _validate(max_seq_len: int, pii: str) -> None:
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise InvalidInput(
            f"Invalid max_seq_len {max_seq_len!r}",
            fix="Give a positive number of tokens, e.g. --max-seq-len 1024.",
            param="--max-seq-len",
        )
    if pii not in PII_POLICIES:
        raise InvalidInput(
            f"Invalid PII policy {pii!r}",
            fix=f"Use --pii with one of: {', '.join(PII_POLICIES)}.",
            param="--pii",
        )


def _apply_pii(row: dict[str, Any], policy: str) -> dict[str, int]:
    """Count PII per kind in every text of ``row``; redact in place when ``policy`` says so."""
    counts: dict[str, int] = {}
    for key in ("messages", "prompt", "chosen", "rejected"):
        for turn in row.get(key, []):
            findings = find_pii(turn["content"])
            for finding in findings:
                counts[finding.kind] = counts.get(finding.kind, 0) + 1
            if findings and policy == "redact":
                turn["content"] = redact(turn["content"], findings)
    return counts


def _normalise_rows(raw_rows: list[RawRow], form: Format | None, pii: str, report: DataReport):
    """Canonical rows that pass the structural checks, with the PII policy applied."""
    rows: list[dict[str, Any]] = []
    for raw in raw_rows:
        if raw.data is None or form is None:
            report.add(Problem(raw.line, "malformed", raw.error or "unreadable row"))
            continue
        try:
            row = {**form.convert(raw.data), "line": raw.line}
            check_row(form.kind, row)
        except RowError as exc:
            report.add(Problem(raw.line, exc.reason, exc.detail))
            continue
        counts = _apply_pii(row, pii)
        if counts:
            for kind, count in counts.items():
                report.add_pii(kind, raw.line, count)
            detail = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
            report.add(Problem(raw.line, "pii", detail, _PII_ACTIONS[pii]))
            if pii == "drop":
                continue
        rows.append(row)
    return rows


def _check_lengths(
    rows: list[dict[str, Any]], tokenizer, max_seq_len: int, min_answer_tokens: int,
    report: DataReport,
):
    """Rows within ``max_seq_len`` whose answers reach ``min_answer_tokens``, with their sizes.

    Sizes are ``(length, counted tokens)`` per kept row.
    """
    if tokenizer is None:
        return rows, [(0, 0)] * len(rows)
    kept, sizes = [], []
    lengths = token_lengths(rows, tokenizer)
    shortest = answer_lengths(rows, tokenizer)
    for row, (length, counted), answer in zip(rows, lengths, shortest, strict=True):
        if length > max_seq_len:
            detail = f"{length} tokens > max_seq_len {max_seq_len}"
            report.add(Problem(row["line"], "too_long", detail))
            continue
        if answer < min_answer_tokens:
            detail = f"answer of {answer} token(s) < min_answer_tokens {min_answer_tokens}"
            report.add(Problem(row["line"], "too_short", detail))
            continue
        kept.append(row)
        sizes.append((length, counted))
    return kept, sizes


def _analyse(
    source: Path, fmt: str, tokenizer, max_seq_len: int, pii: str, min_answer_tokens: int = 1
) -> tuple[DataReport, list[dict[str, Any]], list[list[int]]]:
    """Run every check; return the report, the kept rows and their near-duplicate groups."""
    _validate(max_seq_len, pii)
    if not isinstance(min_answer_tokens, int) or min_answer_tokens < 1:
        raise InvalidInput(
            f"Invalid min_answer_tokens {min_answer_tokens!r}",
            fix="Give a whole number of tokens >= 1 (1 only rejects empty answers).",
            param="min_answer_tokens",
        )
    source = Path(source)
    file_type, raw_rows = read_rows(source)
    if not raw_rows:
        raise InvalidInput(f"Dataset {source} has no rows", fix="Give a file with rows.")
    readable = [r.data for r in raw_rows if r.data is not None]
    form = detect_format(readable, fmt) if readable or fmt != "auto" else None
    report = DataReport(
        source=str(source),
        sha256=sha256_file(source),
        format=form.name if form else "unknown",
        kind=form.kind if form else "sft",
        file_type=file_type,
        rows_in=len(raw_rows),
        pii_policy=pii,
        max_seq_len=max_seq_len,
        length_checked=tokenizer is not None,
        min_answer_tokens=min_answer_tokens,
    )
    rows = _normalise_rows(raw_rows, form, pii, report)
    rows, sizes = _check_lengths(rows, tokenizer, max_seq_len, min_answer_tokens, report)
    duplicates, groups = find_duplicates(rows)
    for dup in duplicates:
        line, twin = rows[dup.index]["line"], rows[dup.twin]["line"]
        if dup.exact:
            report.add(Problem(line, "exact_duplicate", f"same as line {twin}"))
        elif dup.relation == "near":
            how = "same normalised text" if dup.similarity == 1.0 else (
                f"MinHash Jaccard {dup.similarity:.2f}")
            detail = f"near twin of line {twin} ({how}); kept in its split"
            report.add(Problem(line, "near_duplicate", detail, "kept"))
        else:
            detail = f"same prompt as line {twin} with a different answer; kept in its split"
            report.add(Problem(line, "same_prompt", detail, "kept"))
    # Groups hold every row except exact duplicates: re-index them onto the kept rows.
    keep = sorted(i for g in groups for i in g)
    position = {old: new for new, old in enumerate(keep)}
    report.rows_kept = len(keep)
    report.near_duplicate_groups = sum(len(g) > 1 for g in groups)
    report.max_tokens = max((sizes[i][0] for i in keep), default=0)
    report.total_tokens = sum(sizes[i][1] for i in keep)
    report.problems.sort(key=lambda p: (p.line, p.reason))
    if not keep:
        raise NoUsableRows(report)
    return report, [rows[i] for i in keep], [[position[i] for i in g] for g in groups]


def check_dataset(
    source: Path,
    *,
    fmt: str = "auto",
    tokenizer=None,
    max_seq_len: int = 1024,
    pii: PiiPolicy = "redact",
    min_answer_tokens: int = 1,
) -> DataReport:
    """Check a dataset file without writing anything.

    Args:
        source: JSONL, JSON or CSV file.
        fmt: ``auto`` or a `train.data.formats.FORMATS` name.
        tokenizer: The base tokenizer (with a chat template); None skips the length check.
        max_seq_len: Rows longer than this many tokens are dropped.
        pii: What the report says would happen to rows with personal data.
        min_answer_tokens: Rows with a shorter answer are dropped (checked with a tokenizer).

    Returns:
        The report (``splits`` all zero).

    Raises:
        InvalidInput: Unreadable file, unknown format, bad arguments; `NoUsableRows` when no row
            survives the checks.
    """
    report, _, _ = _analyse(Path(source), fmt, tokenizer, max_seq_len, pii, min_answer_tokens)
    return report


def prepare_dataset(
    source: Path,
    out: Path,
    *,
    fmt: str = "auto",
    tokenizer=None,
    max_seq_len: int = 1024,
    pii: PiiPolicy = "redact",
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
    min_answer_tokens: int = 1,
    origin: dict[str, Any] | None = None,
) -> DataReport:
    """Check a dataset and write its splits and report into ``out`` atomically.

    ``out`` receives ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (canonical rows, one
    JSON object per line, in source order) and ``data_report.json``.

    Args:
        source: JSONL, JSON or CSV file.
        out: Folder to create (an existing empty folder is fine; otherwise see ``overwrite``).
        fmt: ``auto`` or a `train.data.formats.FORMATS` name.
        tokenizer: The base tokenizer (with a chat template); None skips the length check.
        max_seq_len: Rows longer than this many tokens are dropped.
        pii: ``drop`` rows with personal data, ``redact`` it (``[EMAIL]`` ...) or ``keep`` it.
        seed: Split seed.
        splits: Train, validation and test fractions.
        overwrite: Replace an existing non-empty ``out``.
        min_answer_tokens: Rows with a shorter answer are dropped (checked with a tokenizer).
        origin: Where ``source`` came from when it was fetched (``hf://`` datasets: repo,
            revision, sha), recorded in the report.

    Returns:
        The report, with split counts, seed and fractions filled in.

    Raises:
        InvalidInput: As `check_dataset`, bad fractions, or ``out`` exists and is not empty.
    """
    fractions = check_fractions(splits)
    report, rows, groups = _analyse(
        Path(source), fmt, tokenizer, max_seq_len, pii, min_answer_tokens
    )
    report.origin = origin
    if origin:  # name the pinned Hub file, not its place in the local cache
        report.source = f"hf://datasets/{origin['repo']}@{origin['sha']}/{origin['file']}"
    assignment, notes = split_groups(groups, seed=seed, fractions=fractions)
    report.splits = {name: len(assignment[name]) for name in SPLIT_NAMES}
    report.seed = seed
    report.split_fractions = list(fractions)
    report.notes.extend(notes)
    out = Path(out)
    replace = overwrite or (out.is_dir() and not any(out.iterdir()))
    with atomic_dir(out, overwrite=replace) as tmp:
        for name in SPLIT_NAMES:
            with open(tmp / SPLIT_FILES[name], "w", encoding="utf-8") as fh:
                for index in assignment[name]:
                    fh.write(json.dumps(rows[index], ensure_ascii=False) + "\n")
        (tmp / REPORT_FILE).write_text(
            json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return report


def read_split(path: Path) -> list[dict[str, Any]]:
    """Read a split file written by `prepare_dataset` (canonical rows, in file order)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_report(folder: Path) -> DataReport:
    """Read ``data_report.json`` from a folder written by `prepare_dataset`."""
    return DataReport.from_dict(json.loads((Path(folder) / REPORT_FILE).read_text("utf-8")))
