"""MinHash near duplicates, same-prompt rows, min_answer_tokens and Parquet input (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub.errors import InvalidInput
from train.data import SPLIT_FILES, check_dataset, load_tokenizer, prepare_dataset, read_split
from train.data.dedup import find_duplicates, prompt_key, shingles

LONG = (
    "The quarterly report shows that revenue in the northern region grew by twelve percent "
    "while costs stayed flat, mostly because the new warehouse opened in March and shipping "
    "times fell from five days to three for most customers in the area"
)


def _chat(user: str, answer: str, system: str | None = None) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": [*turns, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def _canon(rows: list[dict]) -> list[dict]:
    return [{**r, "line": i + 1} for i, r in enumerate(rows)]


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("a", "b", "related"),
    [
        # one word changed in a 40-word text: word 3-gram Jaccard ~0.86
        (LONG, LONG.replace("twelve", "eleven"), True),
        (LONG, LONG.replace("twelve percent", "a lot").replace("March", "May"), False),
        ("Question number 2?", "Question number 22?", False),  # short texts differ
        ("What is the capital of France?", "what is the CAPITAL of france", True),  # normalised
        ("Summarise: " + LONG, "Translate: " + LONG[:60], False),
    ],
)
def test_near_duplicates(a: str, b: str, related: bool) -> None:
    rows = _canon([_chat(a, "Answer one."), _chat(b, "Answer one.")])
    duplicates, groups = find_duplicates(rows)
    assert (len(groups) == 1) is related
    assert [d.relation for d in duplicates] == (["near"] if related else [])


def test_shared_system_prompt_does_not_make_rows_near_twins() -> None:
    system = "You are a helpful assistant. " * 10
    rows = _canon([_chat(f"Tell me about topic {i} please", f"Topic {i}.", system)
                   for i in range(5)])
    _, groups = find_duplicates(rows)
    assert len(groups) == 5


def test_same_prompt_with_different_answers_is_one_group() -> None:
    rows = _canon([
        _chat("Name a colour.", "Red."),
        _chat("Something else entirely.", "Yes."),
        _chat("name a colour", "Blue, like the sky."),
    ])
    duplicates, groups = find_duplicates(rows)
    assert groups == [[0, 2], [1]]
    assert [(d.index, d.twin, d.relation) for d in duplicates] == [(2, 0, "same_prompt")]
    assert prompt_key(rows[0]) == prompt_key(rows[2])


def test_cjk_text_is_shingled_per_character() -> None:
    assert shingles("東京都") == {"東 京 都"}
    assert len(shingles("我们今天去东京看樱花")) == 8


def _dataset() -> list[dict]:
    rows = [_chat(f"Write sentence {i} about {w}.", f"{w.title()} sentence number {i} is here.")
            for i, w in enumerate(["apples", "boats", "clouds", "dunes", "eels", "ferns",
                                   "geese", "hills", "isles", "jams", "kites", "lakes",
                                   "moons", "nests", "oaks", "pears", "quays", "rivers",
                                   "seas", "towers"])]
    rows.append(_chat(LONG, "Revenue grew."))  # 21: a cluster of three near twins
    rows.append(_chat(LONG.replace("twelve", "eleven"), "Revenue grew."))
    rows.append(_chat(LONG.replace("March", "April"), "Revenue grew."))
    rows.append(_chat("Pick a number.", "Seven."))  # 24, 25: same prompt, different answers
    rows.append(_chat("Pick a number!", "Forty-two, the answer to everything."))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_clusters_stay_in_one_split(tmp_path: Path, seed: int) -> None:
    report = prepare_dataset(_write(tmp_path, _dataset()), tmp_path / "out", seed=seed)
    assert report.near_duplicate_groups == 2
    reasons = {(p.line, p.reason, p.action) for p in report.problems}
    assert {(22, "near_duplicate", "kept"), (23, "near_duplicate", "kept"),
            (25, "same_prompt", "kept")} <= reasons
    where = {}
    for name, file in SPLIT_FILES.items():
        for row in read_split(tmp_path / "out" / file):
            where[row["line"]] = name
    assert where[21] == where[22] == where[23]
    assert where[24] == where[25]
    assert sorted(where) == list(range(1, 26))


class _WordTokenizer:
    """Counts whitespace words as tokens, so the test states exact lengths."""

    chat_template = "x"

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False) -> str:
        return " ".join(m["content"] for m in messages)

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [t.split() for t in texts]}


def test_min_answer_tokens_drops_short_answers_with_line_numbers(tmp_path: Path) -> None:
    rows = [_chat("q one", "a fine long answer"), _chat("q two", "ok"),
            _chat("q three", "two words"), _chat("q four", "three whole words")]
    path = _write(tmp_path, rows)
    report = check_dataset(path, tokenizer=_WordTokenizer(), min_answer_tokens=3)
    assert report.dropped == {"too_short": 2}
    assert report.dropped_lines == {"too_short": [2, 3]}
    details = [p.detail for p in report.problems if p.reason == "too_short"]
    assert details == ["answer of 1 token(s) < min_answer_tokens 3",
                       "answer of 2 token(s) < min_answer_tokens 3"]
    assert "line 2: too_short" in report.render()
    # Preference rows: the shorter of chosen and rejected counts.
    pref = [{"prompt": "p", "chosen": "a good long answer", "rejected": "no"},
            {"prompt": "q", "chosen": "fine answer here", "rejected": "bad answer here"}]
    report = check_dataset(_write(tmp_path, pref), tokenizer=_WordTokenizer(),
                           min_answer_tokens=2)
    assert report.dropped_lines == {"too_short": [1]}
    with pytest.raises(InvalidInput, match="min_answer_tokens"):
        check_dataset(path, tokenizer=_WordTokenizer(), min_answer_tokens=0)


def test_min_answer_tokens_with_the_real_tokenizer(tmp_path: Path, base_info) -> None:
    rows = [_chat("Say hi.", "Hi"), _chat("Greet me warmly.", "Hello there, friend!")]
    report = check_dataset(_write(tmp_path, rows), tokenizer=load_tokenizer(base_info.path),
                           min_answer_tokens=2)
    assert report.dropped_lines == {"too_short": [1]}


def test_parquet_input(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_chat(f"Question {w}?", f"Answer about {w}.") for w in ("alpha", "beta", "gamma")]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = prepare_dataset(path, tmp_path / "out")
    assert (report.file_type, report.format, report.rows_kept) == ("parquet", "chat", 3)
    lines = sorted(r["line"] for f in SPLIT_FILES.values()
                   for r in read_split(tmp_path / "out" / f))
    assert lines == [1, 2, 3]
