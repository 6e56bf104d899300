"""Table-driven tests of the text metrics and the verdict rule (pure Python, no model)."""

from __future__ import annotations

import math

import pytest

from train.eval import metrics
from train.eval.report import significance as report_significance
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
        ("The CAT!", "the cat", 1.0),  # case-folded word tokens
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
        ("Tomás moved to Porto", ["tomás", "moved", "to", "porto"]),
        ("Toma\u0301s", ["tomás"]),  # decomposed accent: NFKC composes it, still one token
        ("ÉCOLE  Straße", ["école", "strasse"]),  # case folding
        ("東京に住む", ["東", "京", "に", "住", "む"]),  # CJK: one token per character
        ("서울에 산다", ["서울에", "산다"]),  # Hangul is written with spaces: words
        ("Москва, 2024!", ["москва", "2024"]),
        ("snake_case don't", ["snake", "case", "don", "t"]),
        ("", []),
    ],
)
def test_word_tokens_are_unicode_aware(text: str, expected: list[str]) -> None:
    assert metrics.word_tokens(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Tomás", "Tomás", 1.0),
        ("Tomás", "Tomas", 0.0),  # one token each, and they differ
        ("東京都", "東京", 0.8),  # LCS 2, P = 2/3, R = 1: F1 = 0.8
        ("北京", "東京", 0.5),
    ],
)
def test_rouge_l_unicode(prediction: str, reference: str, expected: float) -> None:
    assert metrics.rouge_l(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("sat cat the", "the cat sat", 1.0),  # order ignored
        ("the the cat", "the cat", 0.8),  # overlap 2, P = 2/3, R = 1
        ("a b", "c d", 0.0),
        ("", "", 1.0),
        ("", "x", 0.0),
    ],
)
def test_token_f1(prediction: str, reference: str, expected: float) -> None:
    assert metrics.token_f1(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ('{"name": "Ann", "age": 3}', '{"age": 3, "name": "Ann"}', (1.0, 1.0, 1.0)),
        # one of two right, nothing extra
        ('{"name": "Ann", "age": 4}', '{"name": "Ann", "age": 3}', (0.5, 0.5, 0.5)),
        # one missing field: precision 1/1, recall 1/2, accuracy 1/2
        ('{"name": "Ann"}', '{"name": "Ann", "age": 3}', (1.0, 0.5, 0.5)),
        # one extra field: precision 2/3, recall 1, accuracy 2/3
        ('{"name": "Ann", "age": 3, "x": 1}', '{"name": "Ann", "age": 3}', (2 / 3, 1.0, 2 / 3)),
        ('{"age": "3"}', '{"age": 3}', (0.0, 0.0, 0.0)),  # types matter
        ('{"p": {"city": "Oslo", "zip": 1}}', '{"p": {"city": "Oslo", "zip": 2}}',
         (0.5, 0.5, 0.5)),  # nested: leaf paths p.city, p.zip
        ("not json", '{"a": 1}', (0.0, 0.0, 0.0)),
        ("[1, 2]", "[1, 2]", (1.0, 1.0, 1.0)),  # a top-level array is one field
    ],
)
def test_field_scores(prediction: str, reference: str, expected: tuple) -> None:
    got = metrics.field_scores(prediction, reference)
    assert (got["field_precision"], got["field_recall"], got["field_accuracy"]) == pytest.approx(
        expected
    )


def test_field_metrics_average_over_json_references_only() -> None:
    preds = ['{"a": 1, "b": 2}', '{"a": 5}', "free"]
    refs = ['{"a": 1, "b": 2}', '{"a": 1}', "plain answer"]
    got = metrics.field_metrics(preds, refs)
    assert got == {"field_precision": 0.5, "field_recall": 0.5, "field_accuracy": 0.5}
    assert metrics.field_scores("x", "plain") is None
    assert metrics.field_metrics(["x"], ["plain"])["field_accuracy"] is None


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
    ("adapter", "few_shot", "passed", "strong", "significance"),
    [
        # 0.75 vs 0.5 is +50 % relative, but the interval [0, +0.75] includes 0.
        ([1, 1, 1, 0], [1, 1, 0, 0], False, False, "not significant"),
        ([1, 1, 0, 0], [1, 1, 0, 0], False, False, "not significant"),  # equal
        ([0, 0, 0, 0], [1, 0, 0, 0], False, False, "not significant"),
        ([1, 0, 0, 0], [0, 0, 0, 0], False, False, "not significant"),  # baseline 0, +0.25
        ([1, 1, 1, 1], [0, 0, 0, 0], True, True, "higher"),  # every pair gains: [+1, +1]
        ([1] * 18 + [0] * 2, [1] * 6 + [0] * 14, True, True, "higher"),  # 0.9 vs 0.3
        ([1] * 6 + [0] * 14, [1] * 18 + [0] * 2, False, False, "lower"),
        ([1.0], [0.0], False, False, "not significant"),  # one example: no interval
        # A significant gain below the 5 % rule: 0.93 vs 0.90 (+3.3 %), six pairs gain, none lose.
        ([1] * 186 + [0] * 14, [1] * 180 + [0] * 20, False, False, "higher"),
    ],
)
def test_verdict_rule(
    adapter: list, few_shot: list, passed: bool, strong: bool, significance: str
) -> None:
    per_example = {
        "adapter": [float(x) for x in adapter],
        "few_shot": [float(x) for x in few_shot],
        "base": [0.0] * len(adapter),
    }
    result = verdict("exact_match", per_example, baseline="few_shot", shots=3)
    assert result["passed"] is passed
    assert result["strong"] is strong
    assert result["significance"] == significance
    assert result["adapter"] == sum(adapter) / len(adapter)
    assert result["baseline_score"] == sum(few_shot) / len(few_shot)
    assert result["sentence"].startswith(
        "The adapter beats" if passed else "The adapter does NOT beat"
    )
    if significance == "not significant":
        assert "not significant" in result["sentence"]
    assert "3-shot base" in result["sentence"]
    assert "5%" in result["rule"] and "interval" in result["rule"] and "above 0" in result["rule"]


@pytest.mark.parametrize(
    ("ci", "expected"),
    [
        (None, "not significant"),
        ((0.0, 0.75), "not significant"),  # touching 0 includes it
        ((-0.1, 0.2), "not significant"),
        ((0.01, 0.3), "higher"),
        ((-0.3, -0.01), "lower"),
        ((-0.2, 0.0), "not significant"),
    ],
)
def test_significance(ci: tuple[float, float] | None, expected: str) -> None:
    assert report_significance(ci) == expected
