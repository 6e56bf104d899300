"""Reading dataset files into raw rows with source line numbers: JSONL, JSON, CSV/TSV, Parquet.

Line numbers are 1-based and are what every problem report quotes:

- JSONL: the physical line of the row (blank lines are skipped, not counted as rows).
- CSV/TSV: the physical file line where the record starts, counting the header as line 1 (so
  the first data row is line 2; a quoted cell spanning lines moves later rows down).
- JSON (a list of objects): the item's index + 1 (not a file line).
- Parquet (read with pyarrow, which `datasets` brings): the row's index + 1.

A row that cannot be read (bad JSON, not an object, wrong number of CSV cells) becomes a
`RawRow` with ``error`` set, so one bad line never stops the run. A file that cannot be read at
all (missing, not UTF-8 where the whole file must be decoded, a JSON file that is neither a list
nor JSON Lines) raises `hub.errors.InvalidInput`.

Where the job ends: loaders know nothing about chat/alpaca/preference fields; `train.data.formats`
turns raw rows into canonical ones.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hub.errors import InvalidInput

FileType = Literal["jsonl", "json", "csv", "tsv", "parquet"]
SUFFIXES: dict[str, FileType] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
# CSV cells in these columns may hold a JSON list of messages, e.g. [{"role": "user", ...}].
MESSAGE_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")


@dataclass(frozen=True)
class RawRow:
    """One row as read from the file.

    Attributes:
        line: 1-based source line (see the module docstring for what it means per file type).
        data: The row's fields, or None when the row could not be read.
        error: Why the row could not be read (None when ``data`` is set).
    """

    line: int
    data: dict[str, Any] | None
    error: str | None = None


def detect_file_type(path: Path) -> FileType:
    """Return the file type from the suffix, or sniffed from the first character.

    Raises:
        InvalidInput: If the file is empty.
    """
    suffix = path.suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise InvalidInput(f"Dataset {path} is empty", fix="Give a file with at least one row.")
    if head[:1] == b"[":
        return "json"
    if head[:1] == b"{":
        return "jsonl"
    return "csv"


def read_rows(path: Path, file_type: FileType | None = None) -> tuple[FileType, list[RawRow]]:
    """Read ``path`` into raw rows.

    Args:
        path: The dataset file.
        file_type: Force a file type instead of detecting it from the suffix.

    Returns:
        The file type used and the rows in file order.

    Raises:
        InvalidInput: If the file is missing or cannot be read as a whole.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(
            f"Dataset file {str(path)!r} does not exist or is not a file",
            fix="Check the path (JSONL, JSON or CSV).",
            param="FILE",
        )
    kind = file_type or detect_file_type(path)
    return kind, LOADERS[kind](path)


def _parse_object(text: str, line: int) -> RawRow:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRow(line, None, f"invalid JSON ({exc.msg} at column {exc.colno})")
    return _as_row(value, line)


def _as_row(value: Any, line: int) -> RawRow:
    if not isinstance(value, dict):
        return RawRow(line, None, f"expected a JSON object, got {type(value).__name__}")
    return RawRow(line, value)


def read_jsonl(path: Path) -> list[RawRow]:
    """Read JSON Lines: one object per line; blank lines are skipped."""
    rows = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append(RawRow(number, None, f"not UTF-8 ({exc.reason} at byte {exc.start})"))
                continue
            if text.strip():
                rows.append(_parse_object(text, number))
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"Dataset {path} is not UTF-8 ({exc.reason} at byte {exc.start})",
            fix="Re-save the file as UTF-8.",
        ) from exc


def read_json(path: Path) -> list[RawRow]:
    """Read a JSON list of objects; a ``.json`` file that is really JSON Lines is read as such.

    Raises:
        InvalidInput: If the file is not a JSON list (nor JSON Lines).
    """
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and exc.msg == "Extra data":
            return read_jsonl(path)
        raise InvalidInput(
            f"Dataset {path} is not valid JSON ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno})",
            fix="Fix the JSON, or save one object per line as .jsonl so that one bad row "
            "does not spoil the file.",
        ) from exc
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise InvalidInput(
            f"Dataset {path} holds a JSON {type(value).__name__}, expected a list of objects",
            fix="Write the rows as a JSON list [{...}, {...}] or as JSON Lines.",
        )
    return [_as_row(item, index + 1) for index, item in enumerate(value)]


def _decode_cell(column: str, cell: str) -> Any:
    if column in MESSAGE_COLUMNS and cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return value
    return cell


def _read_delimited(path: Path, delimiter: str) -> list[RawRow]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return []
    except csv.Error as exc:
        raise InvalidInput(f"Dataset {path}: unreadable CSV header ({exc})") from exc
    rows: list[RawRow] = []
    previous_end = reader.line_num
    while True:
        start = previous_end + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append(RawRow(start, None, f"unreadable CSV record ({exc})"))
            previous_end = reader.line_num
            continue
        previous_end = reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            rows.append(RawRow(start, None, f"{len(cells)} cells, the header has {len(header)}"))
            continue
        fields = {h: _decode_cell(h, c) for h, c in zip(header, cells, strict=True)}
        rows.append(RawRow(start, fields))
    return rows


def read_csv(path: Path) -> list[RawRow]:
    """Read comma-separated values with a header row (JSON message lists allowed in cells)."""
    return _read_delimited(path, ",")


def read_tsv(path: Path) -> list[RawRow]:
    """Read tab-separated values with a header row."""
    return _read_delimited(path, "\t")


def read_parquet(path: Path) -> list[RawRow]:
    """Read a Parquet file (one row per record; nested lists of messages stay lists)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise InvalidInput(
            f"Cannot read {path} as Parquet: {exc}", fix="Give a valid Parquet file.",
            param="FILE",
        ) from exc
    return [_as_row(record, index + 1) for index, record in enumerate(table.to_pylist())]


LOADERS: dict[FileType, Callable[[Path], list[RawRow]]] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "tsv": read_tsv,
    "parquet": read_parquet,
}
