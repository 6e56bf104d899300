"""Deterministic 80/10/10 split, minimum sizes, no near-twin leakage, and the prepared folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hub.errors import InvalidInput
from train.data import SPLIT_FILES, prepare_dataset, read_report, read_split
from train.data.dedup import near_key, normalise
from train.data.split import split_groups


def _rows(n: int, twins_every: int = 0) -> list[dict]:
    """``n`` distinct rows; every ``twins_every``-th row is followed by a near twin of itself."""
    rows = []
    for i in range(n):
        rows.append({"prompt": f"Question number {i}?", "completion": f"Answer {i}."})
        if twins_every and i % twins_every == 0:
            rows.append({"prompt": f"QUESTION  number {i}", "completion": f"answer {i}!!"})
    return rows


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _splits(out: Path) -> dict[str, list[dict]]:
    return {name: read_split(out / file) for name, file in SPLIT_FILES.items()}


@pytest.mark.parametrize(
    "n,expected",
    [
        (3, (1, 1, 1)),
        (4, (2, 1, 1)),
        (10, (8, 1, 1)),
        (25, (21, 2, 2)),
        (100, (80, 10, 10)),
        (1000, (800, 100, 100)),
    ],
)
def test_proportions_and_minimum_sizes(n, expected):
    split, notes = split_groups([[i] for i in range(n)], seed=0)
    assert tuple(len(split[k]) for k in ("train", "validation", "test")) == expected
    assert notes == []
    assert sorted(split["train"] + split["validation"] + split["test"]) == list(range(n))


def test_too_few_rows_go_to_train_with_a_note():
    split, notes = split_groups([[0], [1]], seed=0)
    assert split == {"train": [0, 1], "validation": [], "test": []}
    assert any("validation split is empty" in n for n in notes)


def test_split_is_deterministic_and_seed_dependent(tmp_path):
    source = _write(tmp_path, _rows(60))
    a = prepare_dataset(source, tmp_path / "a", seed=7)
    b = prepare_dataset(source, tmp_path / "b", seed=7)
    c = prepare_dataset(source, tmp_path / "c", seed=8)
    for name in SPLIT_FILES.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.splits == b.splits == {"train": 48, "validation": 6, "test": 6}
    lines = {k: [r["line"] for r in v] for k, v in _splits(tmp_path / "a").items()}
    other = {k: [r["line"] for r in v] for k, v in _splits(tmp_path / "c").items()}
    assert lines != other and c.splits == a.splits
    assert lines["test"] == sorted(lines["test"])  # file order inside a split


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_near_twins_never_cross_splits(tmp_path, seed):
    source = _write(tmp_path, _rows(80, twins_every=3))
    report = prepare_dataset(source, tmp_path / "out", seed=seed)
    assert report.near_duplicate_groups == 27
    assert report.dropped == {}
    keys = {name: {near_key(r) for r in rows} for name, rows in _splits(tmp_path / "out").items()}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert report.splits["test"] >= 1 and report.splits["validation"] >= 1
    assert sum(report.splits.values()) == report.rows_kept == 107


def test_normalise_ignores_case_whitespace_and_punctuation():
    assert normalise("  Hello,   WORLD!! ") == normalise("hello world") == "hello world"
    assert normalise("Hello world") != normalise("Hello word")


def test_prepared_folder_and_report(tmp_path):
    source = _write(tmp_path, _rows(20) + [_rows(1)[0]])
    out = tmp_path / "prepared"
    report = prepare_dataset(source, out, seed=3)
    assert sorted(p.name for p in out.iterdir()) == [
        "data_report.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    saved = read_report(out)
    assert saved.to_dict() == report.to_dict()
    data = json.loads((out / "data_report.json").read_text())
    for key in ("source", "sha256", "format", "rows_in", "rows_kept", "splits", "dropped"):
        assert key in data
    assert data["rows_in"] == 21 and data["rows_kept"] == 20 and data["seed"] == 3
    assert data["dropped"] == {"exact_duplicate": 1}
    assert data["dropped_lines"] == {"exact_duplicate": [21]}
    assert data["problems"] == [
        {"line": 21, "reason": "exact_duplicate", "detail": "same as line 1", "action": "dropped"}
    ]
    assert data["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_output_must_not_exist_unless_empty_or_overwrite(tmp_path):
    source = _write(tmp_path, _rows(5))
    out = tmp_path / "out"
    out.mkdir()
    prepare_dataset(source, out)  # an empty folder is fine
    with pytest.raises(InvalidInput, match="already exists"):
        prepare_dataset(source, out)
    prepare_dataset(source, out, overwrite=True, seed=1)
    assert read_report(out).seed == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    "splits", [(0.8, 0.1), (0.5, 0.5, 0.5), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)]
)
def test_bad_fractions_are_refused(tmp_path, splits):
    with pytest.raises(InvalidInput, match="split fractions"):
        prepare_dataset(_write(tmp_path, _rows(5)), tmp_path / "out", splits=splits)
    assert not (tmp_path / "out").exists()
