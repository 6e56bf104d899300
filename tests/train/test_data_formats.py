"""Input formats x file types -> canonical rows, line numbers per file type, format detection."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hub.errors import InvalidInput
from train.data import FORMATS, check_dataset, prepare_dataset, read_split
from train.data.formats import detect_format

SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
OTHER = {"role": "assistant", "content": "Lyon, probably."}

# (name, input row, expected canonical row without "line")
CASES = [
    ("chat", {"messages": [SYS, USER, ASSISTANT]}, {"messages": [SYS, USER, ASSISTANT]}),
    (
        "chat-extra-keys",
        {"messages": [{**USER, "name": "x"}, ASSISTANT], "id": 7},
        {"messages": [USER, ASSISTANT]},
    ),
    (
        "alpaca",
        {"instruction": "Capital of France?", "input": "", "output": "Paris."},
        {"messages": [USER, ASSISTANT]},
    ),
    (
        "alpaca-input-system",
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Be brief."},
        {
            "messages": [
                SYS,
                {"role": "user", "content": "Translate.\n\nBonjour"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
    ),
    (
        "completion",
        {"prompt": "Capital of France?", "completion": "Paris."},
        {"messages": [USER, ASSISTANT]},
    ),
    (
        "completion-lists",
        {"prompt": [SYS, USER], "completion": [ASSISTANT]},
        {"messages": [SYS, USER, ASSISTANT]},
    ),
    (
        "preference",
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, probably."},
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [OTHER]},
    ),
    (
        "preference-lists",
        {"prompt": [SYS, USER], "chosen": [ASSISTANT], "rejected": [OTHER]},
        {"prompt": [SYS, USER], "chosen": [ASSISTANT], "rejected": [OTHER]},
    ),
]
EXPECTED_FORMAT = {
    "chat": "chat",
    "chat-extra-keys": "chat",
    "alpaca": "alpaca",
    "alpaca-input-system": "alpaca",
    "completion": "completion",
    "completion-lists": "completion",
    "preference": "preference",
    "preference-lists": "preference",
}


def write(path: Path, rows: list[dict], file_type: str) -> Path:
    """Write ``rows`` as ``file_type``; message lists go into CSV cells as JSON."""
    if file_type == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif file_type == "json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="," if file_type == "csv" else "\t")
            writer.writerow(keys)
            for r in rows:
                cells = [r.get(k, "") for k in keys]
                writer.writerow([c if isinstance(c, str) else json.dumps(c) for c in cells])
    return path


def _reword(value, key=""):
    """The same row with every text changed (roles kept): a different, non-duplicate row."""
    if isinstance(value, dict):
        return {k: _reword(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_reword(v) for v in value]
    return value if key == "role" or not isinstance(value, str) else f"{value} Twice"


@pytest.mark.parametrize("file_type", ["jsonl", "json", "csv", "tsv"])
@pytest.mark.parametrize("name,row,canonical", CASES, ids=[c[0] for c in CASES])
def test_format_and_file_type_to_canonical(tmp_path, file_type, name, row, canonical):
    twin = _reword(row)
    source = write(tmp_path / f"data.{file_type}", [row, twin, row | {}], file_type)
    # Row 3 repeats row 1 exactly, so every file type also proves it reads several rows.
    report = check_dataset(source)
    assert (report.format, report.file_type) == (EXPECTED_FORMAT[name], file_type)
    assert report.kind == FORMATS[report.format].kind
    assert report.rows_in == 3 and report.rows_kept == 2
    first_line = {"jsonl": 1, "json": 1, "csv": 2, "tsv": 2}[file_type]
    assert report.dropped_lines == {"exact_duplicate": [first_line + 2]}
    out = tmp_path / "out"
    prepare_dataset(source, out, splits=(1.0, 0.0, 0.0))
    rows = read_split(out / "train.jsonl")
    assert rows[0] == {**canonical, "line": first_line}


def test_csv_line_numbers_count_header_and_multiline_cells(tmp_path):
    source = tmp_path / "data.csv"
    source.write_text(
        "instruction,input,output\n"  # line 1
        'Say hi,,"Hi\nthere"\n'  # lines 2-3
        "Too,many,cells,here\n"  # line 4
        "\n"  # line 5 (blank, skipped)
        "Say bye,,\n"  # line 6 (empty output)
        "Say yes,,Yes\n"  # line 7
    )
    report = check_dataset(source)
    assert report.rows_in == 4 and report.rows_kept == 2
    assert [(p.line, p.reason) for p in report.problems] == [(4, "malformed"), (6, "empty_field")]


def test_json_list_lines_are_index_plus_one(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, "not an object", {"prompt": "c"}]
    source = tmp_path / "data.json"
    source.write_text(json.dumps(rows, indent=4))
    report = check_dataset(source)
    assert [(p.line, p.reason) for p in report.problems] == [(2, "malformed"), (3, "malformed")]
    assert "missing field 'completion'" in report.problems[1].detail


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    source = tmp_path / "data.json"
    source.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    report = check_dataset(source)
    assert (report.file_type, report.rows_kept) == ("json", 2)


def test_forced_format_reports_rows_of_another_shape(tmp_path):
    source = write(
        tmp_path / "d.jsonl",
        [{"prompt": "p", "completion": "c"}, {"instruction": "i", "output": "o"}],
        "jsonl",
    )
    report = check_dataset(source, fmt="alpaca")
    assert report.format == "alpaca"
    assert [(p.line, p.reason) for p in report.problems] == [(1, "malformed")]


def test_detection_prefers_the_majority_and_preference_over_completion():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "completion": "x"}] * 2
    assert detect_format(rows).name == "preference"
    rows = [{"messages": []}] * 3 + [{"prompt": "p", "completion": "c"}]
    assert detect_format(rows).name == "chat"


@pytest.mark.parametrize(
    "content,fix_mentions",
    [
        ('{"text": "a"}\n{"body": "b"}\n', "--format"),  # no known keys
        ("", "row"),  # empty file
        ("42", "list of objects"),  # JSON that is not a list
        ("instruction,input,output\n", "rows"),  # CSV with only a header
    ],
    ids=["unknown-keys", "empty", "json-scalar", "csv-header-only"],
)
def test_unusable_files_raise_invalid_input(tmp_path, content, fix_mentions):
    suffix = ".json" if content == "42" else ".csv" if "," in content else ".jsonl"
    source = tmp_path / f"data{suffix}"
    source.write_text(content)
    with pytest.raises(InvalidInput) as info:
        check_dataset(source)
    assert fix_mentions in info.value.one_line()


def test_unknown_format_name_and_missing_file(tmp_path):
    source = write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}], "jsonl")
    with pytest.raises(InvalidInput, match="Unknown dataset format 'sharegpt'"):
        check_dataset(source, fmt="sharegpt")
    with pytest.raises(InvalidInput, match="does not exist"):
        check_dataset(tmp_path / "missing.jsonl")
