"""Text metrics and their aggregation: exact match, ROUGE-L, token F1, JSON fields, perplexity.

Every function here is pure Python on strings and numbers, so the rules are table-testable and
identical wherever they run. Definitions (also printed in the eval report):

- **exact match**: the prediction equals the reference after trimming and collapsing whitespace;
  when the reference is JSON (an object or an array), the prediction must parse to an equal
  value instead (key order and spacing do not matter; types do: ``1`` is not ``1.0`` or ``true``).
- **word tokens** (`word_tokens`): the text NFKC-normalised and case-folded, then each Han,
  Hiragana or Katakana character is one token (those scripts write no spaces) and every other
  run of Unicode letters, marks and digits is one token ("Tomás" is one token, "東京" two).
- **ROUGE-L**: the F1 of the longest common subsequence of word tokens
  (precision = LCS / prediction tokens, recall = LCS / reference tokens).
- **token F1**: the F1 of the multiset overlap of word tokens (order ignored, as in SQuAD).
- **JSON fields**: a JSON object is flattened into its leaf fields (``a.b`` for nested objects;
  arrays and scalars are leaves, compared as canonical JSON); a top-level array is one field.
  A field is correct when the prediction has the same path with an equal value. Per example:
  precision = correct / predicted fields, recall = correct / reference fields, accuracy =
  correct / fields in either (a missing and an extra field both count against it); a prediction
  that is not JSON scores 0 on all three. Averaged over the examples whose reference is JSON.
- **JSON validity**: over the examples whose reference is JSON, the share of predictions that
  parse as a JSON object or array (strict: no code fences, no trailing text).
- **perplexity**: ``exp(total negative log-likelihood / token count)`` over the scored tokens of
  all examples together (token-weighted), from the sums that `train.eval.scoring` computes.

Where the job ends: getting the log-likelihoods out of a model is `train.eval.scoring`; choosing a
verdict from these numbers is `train.eval.report`.
"""

from __future__ import annotations

import json
import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import regex

PrimaryMetric = Literal["exact_match", "rouge_l", "preference_accuracy"]

# `regex` (a transformers dependency) knows Unicode scripts; stdlib `re` does not.
_WORD_RE = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]|[\p{L}\p{M}\p{N}]+")
_SPACE_RE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Trim and collapse runs of whitespace to one space."""
    return _SPACE_RE.sub(" ", text).strip()


def parse_json_output(text: str) -> tuple[bool, Any]:
    """Parse ``text`` as JSON output: one object or array, surrounding whitespace allowed.

    A bare number or string is ordinary text, not JSON output.

    Returns:
        ``(True, value)`` when ``text`` is a JSON object or array, else ``(False, None)``.
    """
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return False, None
    try:
        value = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return False, None
    return (True, value) if isinstance(value, dict | list) else (False, None)


def is_json_output(text: str) -> bool:
    """True when ``text`` is exactly one JSON object or array (surrounding whitespace allowed)."""
    return parse_json_output(text)[0]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if ``prediction`` matches ``reference`` (see the module docstring), else 0.0."""
    ref_ok, ref_value = parse_json_output(reference)
    if ref_ok:
        pred_ok, pred_value = parse_json_output(prediction)
        return 1.0 if pred_ok and _canonical(pred_value) == _canonical(ref_value) else 0.0
    return 1.0 if normalise_text(prediction) == normalise_text(reference) else 0.0


def _canonical(value: Any) -> str:
    # Sorted keys, fixed separators; keeps types apart (true vs 1, 1 vs 1.0).
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def word_tokens(text: str) -> list[str]:
    """The word tokens ROUGE-L and token F1 compare (rule: the module docstring)."""
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)·len(b)))."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0] * (len(b) + 1)
        for j, other in enumerate(b, start=1):
            if token == other:
                current[j] = previous[j - 1] + 1
            else:
                current[j] = max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between ``prediction`` and ``reference`` (0.0 when either has no word)."""
    pred, ref = word_tokens(prediction), word_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the word-token multiset overlap (1.0 when both have no word, 0.0 when one has)."""
    pred, ref = word_tokens(prediction), word_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def json_fields(value: Any, prefix: str = "") -> dict[str, str]:
    """Leaf fields of a JSON value as ``{path: canonical JSON}`` (rule: the module docstring)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(json_fields(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix or "$": _canonical(value)}


def field_scores(prediction: str, reference: str) -> dict[str, float] | None:
    """Field-level precision, recall and accuracy of one prediction (None: reference not JSON)."""
    ref_ok, ref_value = parse_json_output(reference)
    if not ref_ok:
        return None
    ref = json_fields(ref_value)
    pred_ok, pred_value = parse_json_output(prediction)
    pred = json_fields(pred_value) if pred_ok else {}
    correct = sum(1 for path, value in pred.items() if ref.get(path) == value)
    union = len(set(pred) | set(ref))
    return {
        "field_precision": correct / len(pred) if pred else 0.0,
        "field_recall": correct / len(ref) if ref else 0.0,
        "field_accuracy": correct / union if union else 0.0,
    }


def field_metrics(
    predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float | None]:
    """Mean field precision, recall and accuracy over the examples whose reference is JSON.

    Returns:
        ``{"field_precision", "field_recall", "field_accuracy"}``, each None when no reference
        is JSON (the metrics do not apply).
    """
    keys = ("field_precision", "field_recall", "field_accuracy")
    scores = [
        s
        for s in (field_scores(p, r) for p, r in zip(predictions, references, strict=True))
        if s is not None
    ]
    return {k: mean([s[k] for s in scores]) for k in keys}


def json_validity(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Share of predictions that are JSON, over the examples whose reference is JSON.

    Returns:
        The rate in [0, 1], or None when no reference is JSON (the metric does not apply).
    """
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if is_json_output(r)]
    if not pairs:
        return None
    return sum(is_json_output(p) for p, _ in pairs) / len(pairs)


def perplexity(nll_sum: float, tokens: int) -> float | None:
    """``exp(nll_sum / tokens)``; None when nothing was scored."""
    if tokens <= 0:
        return None
    return math.exp(nll_sum / tokens)


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean; None for an empty sequence."""
    return sum(values) / len(values) if values else None


def primary_metric(references: Sequence[str]) -> PrimaryMetric:
    """The task metric for an SFT test set: exact match when most references are JSON.

    Rule: ``exact_match`` if at least half of the references are JSON objects/arrays (structured
    output, where only an exact answer is useful), otherwise ``rouge_l``.
    """
    if references and sum(is_json_output(r) for r in references) * 2 >= len(references):
        return "exact_match"
    return "rouge_l"


def relative_improvement(new: float, old: float) -> float | None:
    """``(new - old) / old``; None when ``old`` is 0 (the ratio is undefined)."""
    if old == 0:
        return None
    return (new - old) / old


def beats(new: float, old: float, threshold: float) -> bool:
    """The verdict rule: ``new`` beats ``old`` by at least ``threshold`` (e.g. 0.05 = 5 %).

    Relative improvement ``(new - old) / old >= threshold``; when ``old`` is 0 the relative
    figure is undefined and the absolute gain ``new - old`` must reach ``threshold`` instead.
    """
    rel = relative_improvement(new, old)
    if rel is None:
        return new - old >= threshold
    return rel >= threshold


def paired_bootstrap_ci(
    new: Sequence[float], old: Sequence[float], *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """95 % percentile bootstrap interval of ``mean(new) - mean(old)`` over paired examples.

    Returns:
        ``(low, high)``, or None with fewer than two pairs.
    """
    if len(new) != len(old):
        raise ValueError("paired samples must have the same length")
    n = len(new)
    if n < 2:
        return None
    rng = random.Random(seed)
    diffs = [a - b for a, b in zip(new, old, strict=True)]
    stats = []
    for _ in range(resamples):
        stats.append(sum(diffs[rng.randrange(n)] for _ in range(n)) / n)
    stats.sort()
    return stats[int(0.025 * (resamples - 1))], stats[int(0.975 * (resamples - 1))]
