"""Table-driven tests of the text metrics and the verdict rule (pure Python, no model)."""

from __future__ import annotations

import math

import pytest

from train.eval import metrics
from train.eval.report import verdict


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Paris", "Paris", 1.0),
        ("  Paris \n", "Paris", 1.0),
        ("New   York", "New York", 1.0),
        ("paris", "Paris", 0.0),  # case matters for exact match
        ("Paris.", "Paris", 0.0),
        ('{"a": 1, "b": [1, 2]}', '{"b":[1,2],"a":1}', 1.0),  # JSON: key order and spacing
        ('{"a": 1.0}', '{"a": 1}', 0.0),  # JSON: types matter
        ('{"a": true}', '{"a": 1}', 0.0),
        ('```json\n{"a": 1}\n```', '{"a": 1}', 0.0),  # fenced JSON is not JSON
        ('{"a": 1} trailing', '{"a": 1}', 0.0),
        ("", "", 1.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert metrics.exact_match(prediction, reference) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a b c d", "a c d", 3),
        ("a b c", "d e f", 0),
        ("", "a", 0),
        ("a b a b", "b a b a", 3),
        ("x a y b z c", "a b c", 3),
    ],
)
def test_lcs_length(a: str, b: str, expected: int) -> None:
    assert metrics.lcs_length(a.split(), b.split()) == expected
    assert metrics.lcs_length(b.split(), a.split()) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # LCS 2 ("a c"), P = 2/2, R = 2/4: F1 = 2PR/(P+R) = 2/3.
        ("a c", "a b c d", 2 / 3),
        ("The CAT!", "the cat", 1.0),  # lower-cased alphanumeric tokens
        ('{"name": "Ann"}', '{"name": "Bob"}', 0.5),
        ("", "something", 0.0),
        ("nothing shared", "at all", 0.0),
    ],
)
def test_rouge_l(prediction: str, reference: str, expected: float) -> None:
    assert metrics.rouge_l(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', True),
        ("  [1, 2]\n", True),
        ("42", False),  # a bare number is text, not JSON output
        ('"a string"', False),
        ("{'a': 1}", False),
        ('{"a": 1', False),
        ("", False),
    ],
)
def test_is_json_output(text: str, expected: bool) -> None:
    assert metrics.is_json_output(text) is expected


def test_json_validity_counts_only_rows_with_json_references() -> None:
    preds = ['{"a": 1}', "not json", '{"b": 2}', "free text"]
    refs = ['{"a": 1}', '{"a": 2}', "plain answer", "plain answer"]
    assert metrics.json_validity(preds, refs) == 0.5
    assert metrics.json_validity(["x"], ["plain"]) is None


@pytest.mark.parametrize(
    ("nll", "tokens", "expected"),
    [(0.0, 5, 1.0), (math.log(4) * 3, 3, 4.0), (1.0, 0, None)],
)
def test_perplexity(nll: float, tokens: int, expected: float | None) -> None:
    got = metrics.perplexity(nll, tokens)
    assert got == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    ("references", "expected"),
    [
        (['{"a": 1}', '{"a": 2}', "text"], "exact_match"),
        (['{"a": 1}', "text"], "exact_match"),  # half JSON is enough
        (['{"a": 1}', "text", "more text"], "rouge_l"),
        ([], "rouge_l"),
    ],
)
def test_primary_metric(references: list[str], expected: str) -> None:
    assert metrics.primary_metric(references) == expected


@pytest.mark.parametrize(
    ("new", "old", "threshold", "expected"),
    [
        (0.525, 0.5, 0.05, True),  # exactly +5 % relative
        (0.52, 0.5, 0.05, False),  # +4 %
        (0.55, 0.5, 0.10, True),
        (0.54, 0.5, 0.10, False),
        (0.05, 0.0, 0.05, True),  # baseline 0: absolute gain decides
        (0.04, 0.0, 0.05, False),
        (0.4, 0.5, 0.05, False),
    ],
)
def test_beats(new: float, old: float, threshold: float, expected: bool) -> None:
    assert metrics.beats(new, old, threshold) is expected


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean() -> None:
    new = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    old = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    ci = metrics.paired_bootstrap_ci(new, old)
    assert ci == metrics.paired_bootstrap_ci(new, old)
    low, high = ci
    assert low <= (sum(new) - sum(old)) / len(new) <= high
    assert metrics.paired_bootstrap_ci([1.0], [0.0]) is None


@pytest.mark.parametrize(
    ("adapter", "few_shot", "passed", "strong"),
    [
        ([1, 1, 1, 0], [1, 1, 0, 0], True, True),  # 0.75 vs 0.5: +50 %
        ([1, 1, 0, 0], [1, 1, 0, 0], False, False),  # equal
        ([0, 0, 0, 0], [1, 0, 0, 0], False, False),
        ([1, 0, 0, 0], [0, 0, 0, 0], True, True),  # baseline 0, absolute +0.25
    ],
)
def test_verdict_rule(adapter: list, few_shot: list, passed: bool, strong: bool) -> None:
    per_example = {
        "adapter": [float(x) for x in adapter],
        "few_shot": [float(x) for x in few_shot],
        "base": [0.0] * len(adapter),
    }
    result = verdict("exact_match", per_example, baseline="few_shot", shots=3)
    assert result["passed"] is passed
    assert result["strong"] is strong
    assert result["adapter"] == sum(adapter) / len(adapter)
    assert result["baseline_score"] == sum(few_shot) / len(few_shot)
    assert result["sentence"].startswith(
        "The adapter beats" if passed else "The adapter does NOT beat"
    )
    assert "3-shot base" in result["sentence"]
    assert "5%" in result["rule"]
