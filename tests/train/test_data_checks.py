"""One test per problem type: each is reported under its reason with the right line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.data import REASONS, NoUsableRows, check_dataset, load_tokenizer

BAD_CHAT = Path(__file__).parent / "data" / "bad_chat.jsonl"

# tests/train/data/bad_chat.jsonl: (line, reason, action, words in the detail).
EXPECTED = [
    (2, "malformed", "dropped", "invalid JSON"),
    (3, "malformed", "dropped", "expected a JSON object, got list"),
    (4, "malformed", "dropped", "missing field 'messages'"),
    (5, "malformed", "dropped", "'content' must be a string, got int"),
    (6, "empty_field", "dropped", "turn 1 (user) is empty"),
    (7, "role_order", "dropped", "must start with a user turn"),
    (8, "role_order", "dropped", "turns 1 and 2 are both user"),
    (9, "role_order", "dropped", "no assistant turn"),
    (10, "role_order", "dropped", "unknown role 'tool'"),
    (11, "exact_duplicate", "dropped", "same as line 1"),
    (12, "near_duplicate", "kept", "near twin of line 1"),
    (14, "pii", "redacted", "email x1"),
    (16, "too_long", "dropped", "tokens > max_seq_len 128"),
    (17, "role_order", "dropped", "turn 2 is a system turn"),
    (18, "role_order", "dropped", "ends with a user turn, expected assistant"),
]


@pytest.fixture(scope="module")
def tokenizer(base_info):
    return load_tokenizer(base_info.path)


@pytest.fixture(scope="module")
def bad_report(tokenizer):
    return check_dataset(BAD_CHAT, tokenizer=tokenizer, max_seq_len=128)


@pytest.mark.parametrize(
    "line,reason,action,detail", EXPECTED, ids=[f"{e[1]}-{e[0]}" for e in EXPECTED]
)
def test_problem_reported_on_its_line(bad_report, line, reason, action, detail):
    found = [p for p in bad_report.problems if p.line == line]
    assert [(p.reason, p.action) for p in found] == [(reason, action)]
    assert detail in found[0].detail


def test_bad_file_counts_and_nothing_else(bad_report):
    assert [(p.line, p.reason) for p in bad_report.problems] == [(e[0], e[1]) for e in EXPECTED]
    assert bad_report.rows_in == 17  # 18 lines, one blank
    assert bad_report.rows_kept == 4  # lines 1, 12, 14, 15
    dropped = [e for e in EXPECTED if e[2] == "dropped"]
    assert sum(bad_report.dropped.values()) == len(dropped) == 17 - 4
    assert bad_report.dropped_lines["role_order"] == [7, 8, 9, 10, 17, 18]
    assert bad_report.pii == {"email": 1} and bad_report.pii_lines == {"email": [14]}
    assert set(bad_report.dropped) <= set(REASONS)
    assert bad_report.length_checked and 0 < bad_report.max_tokens <= 128


def test_without_tokenizer_length_is_not_checked():
    report = check_dataset(BAD_CHAT)
    assert not report.length_checked and "too_long" not in report.dropped
    assert report.rows_kept == 5


def test_length_uses_the_chat_template(tokenizer, tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    ids = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    length = len(tokenizer(ids, add_special_tokens=False)["input_ids"])
    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps(row) + "\n")
    assert check_dataset(source, tokenizer=tokenizer, max_seq_len=length).rows_kept == 1
    with pytest.raises(NoUsableRows) as info:
        check_dataset(source, tokenizer=tokenizer, max_seq_len=length - 1)
    assert info.value.report.dropped_lines == {"too_long": [1]}


def _pref(prompt, chosen="Yes.", rejected="No."):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


U = {"role": "user", "content": "Well?"}
A = {"role": "assistant", "content": "Yes."}
# Rows after a good first row; (row, reason, words in the detail).
OTHER_CASES = [
    (_pref([U, A]), "role_order", "prompt ends with a assistant turn, expected user"),
    (_pref("Q", chosen=[U]), "role_order", "chosen turn is 'user', expected assistant"),
    (_pref("Q", chosen=[A, A]), "role_order", "exactly one assistant turn, got 2"),
    (_pref("Q", rejected="  "), "empty_field", "rejected turn 1 (assistant) is empty"),
    (_pref("Q", chosen=3), "malformed", "'chosen' must be a string or a list of messages"),
    (_pref("Q", chosen="Same", rejected="Same"), "identical_pair", "are the same text"),
    (_pref([]), "empty_field", "prompt is an empty list"),
    ({"prompt": "Q", "chosen": "Yes."}, "malformed", "missing field 'rejected'"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "malformed", "'prompt' is null"),
]


@pytest.mark.parametrize("row,reason,detail", OTHER_CASES, ids=[c[1] for c in OTHER_CASES])
def test_preference_problems(tmp_path, row, reason, detail):
    source = tmp_path / "pref.jsonl"
    source.write_text(json.dumps(_pref("Good?")) + "\n\n" + json.dumps(row) + "\n")
    report = check_dataset(source)
    assert [(p.line, p.reason) for p in report.problems] == [(3, reason)]
    assert detail in report.problems[0].detail


ALPACA_CASES = [
    ({"instruction": "", "output": "x"}, "empty_field"),
    ({"instruction": "Do", "output": 5}, "malformed"),
    ({"instruction": "Do"}, "malformed"),
    ({"instruction": "Do", "input": ["a"], "output": "x"}, "malformed"),
]


@pytest.mark.parametrize("row,reason", ALPACA_CASES)
def test_alpaca_problems(tmp_path, row, reason):
    source = tmp_path / "a.json"
    source.write_text(json.dumps([{"instruction": "Do", "output": "Done"}, row]))
    report = check_dataset(source)
    assert [(p.line, p.reason) for p in report.problems] == [(2, reason)]


def test_non_utf8_line_is_malformed_not_fatal(tmp_path):
    source = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"}).encode()
    source.write_bytes(good + b"\n" + b'{"prompt": "\xff"}\n')
    report = check_dataset(source)
    assert report.rows_kept == 1
    assert [(p.line, p.reason) for p in report.problems] == [(2, "malformed")]
    assert "not UTF-8" in report.problems[0].detail


def test_no_usable_row_raises_with_the_report(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text('{"messages": []}\nnot json\n')
    with pytest.raises(NoUsableRows) as info:
        check_dataset(source)
    assert info.value.report.dropped == {"empty_field": 1, "malformed": 1}
    assert info.value.exit_code != 0 and "no usable row" in info.value.one_line()
