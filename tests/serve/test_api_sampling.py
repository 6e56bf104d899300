"""`serve.runtime.sampling` on hand-made logits: each rule does what its definition says.

Table-driven: every case gives a row's parameters, its history (prompt and generated tokens),
the raw logits, and what the processed logits or the chosen token must be. A batch mixes rows
with different rules to show they stay per row. Grammar rows use the real SmolLM2 tokenizer and
xgrammar (`serve.grammar`), including logits wider than the vocabulary (padded embeddings).
"""

from __future__ import annotations

import json

import pytest
import torch

from hub.errors import InvalidInput
from serve.engine import SamplingParams
from serve.runtime.sampling import _processed, check_params, new_row, sample

NEG = float("-inf")
LOGITS = [2.0, 1.0, -1.0, 0.5, 0.0]


def _row(history: list[int] = (), prompt: list[int] = (), **params):
    row = new_row(SamplingParams(temperature=0, **params), list(prompt))
    row.generated.extend(history)
    return row


# (id, params, prompt, generated, expected processed logits)
PENALTY_CASES = [
    ("none", {}, [], [0, 0, 1], LOGITS),
    # presence: minus p once for every token generated at least once (0 twice, 1 once)
    ("presence", {"presence_penalty": 0.5}, [], [0, 0, 1], [1.5, 0.5, -1.0, 0.5, 0.0]),
    # frequency: minus f per occurrence
    ("frequency", {"frequency_penalty": 0.5}, [], [0, 0, 1], [1.0, 0.5, -1.0, 0.5, 0.0]),
    ("presence+frequency", {"presence_penalty": 1.0, "frequency_penalty": 0.25}, [], [0, 0, 1],
     [0.5, -0.25, -1.0, 0.5, 0.0]),
    # a negative presence penalty encourages repeats
    ("presence-negative", {"presence_penalty": -1.0}, [], [3], [2.0, 1.0, -1.0, 1.5, 0.0]),
    # presence/frequency count the output only, never the prompt
    ("frequency-ignores-prompt", {"frequency_penalty": 1.0}, [0, 1, 2], [], LOGITS),
    # repetition: positive logits divided, negative multiplied, for prompt AND output tokens
    ("repetition", {"repetition_penalty": 2.0}, [2], [0], [1.0, 1.0, -2.0, 0.5, 0.0]),
    ("repetition-below-one", {"repetition_penalty": 0.5}, [3], [2], [2.0, 1.0, -0.5, 1.0, 0.0]),
    ("repetition-counts-once", {"repetition_penalty": 2.0}, [], [0, 0, 0], [1.0, 1.0, -1.0,
                                                                             0.5, 0.0]),
    ("logit-bias", {"logit_bias": {4: 5.0, 0: -100.0}}, [], [], [-98.0, 1.0, -1.0, 0.5, 5.0]),
]


@pytest.mark.parametrize(("params", "prompt", "history", "expected"),
                         [c[1:] for c in PENALTY_CASES], ids=[c[0] for c in PENALTY_CASES])
def test_each_rule_changes_the_logits_as_defined(params, prompt, history, expected):
    row = _row(history, prompt, **params)
    out = _processed(torch.tensor([LOGITS]), [row])
    assert out[0].tolist() == pytest.approx(expected)


def test_rules_stay_per_row_in_one_batch():
    rows = [_row(history, prompt, **params) for _, params, prompt, history, _ in PENALTY_CASES]
    logits = torch.tensor([LOGITS] * len(rows))
    before = logits.clone()
    out = _processed(logits, rows)
    assert torch.equal(logits, before)  # the raw logits are not modified
    for i, case in enumerate(PENALTY_CASES):
        assert out[i].tolist() == pytest.approx(case[4]), case[0]


def test_penalties_decide_the_greedy_token_and_track_what_was_generated():
    # Without a penalty the argmax (0) repeats; a frequency penalty of 2 makes 0 and 1 lose
    # their lead once each has been generated, so greedy walks 0, 1, 3.
    row = _row(frequency_penalty=2.0)
    logits = torch.tensor([LOGITS])
    picked = [sample(logits, [row])[0].token_id for _ in range(3)]
    assert picked == [0, 1, 3]
    assert row.generated == [0, 1, 3]
    assert row.counts[:5].tolist() == [1, 1, 0, 1, 0]


# (id, params, tokens that may ever be drawn)
FILTER_CASES = [
    ("top-k-1", {"top_k": 1}, {0}),
    ("top-k-2", {"top_k": 2}, {0, 1}),
    # probabilities of LOGITS at T=1: .57 .21 .03 .13 .08 -> top_p .7 keeps 0 and 1
    ("top-p", {"top_p": 0.7}, {0, 1}),
    # min_p .2: kept if p >= .2 * .57 = .114 -> 0, 1, 3
    ("min-p", {"min_p": 0.2}, {0, 1, 3}),
    ("top-k-and-min-p", {"top_k": 2, "min_p": 0.2}, {0, 1}),
    ("bias-bans", {"logit_bias": {0: -100.0, 1: -100.0, 3: -100.0, 4: -100.0}}, {2}),
]


@pytest.mark.parametrize(("params", "allowed"), [c[1:] for c in FILTER_CASES],
                         ids=[c[0] for c in FILTER_CASES])
def test_filters_limit_what_can_be_drawn(params, allowed):
    rows = [new_row(SamplingParams(temperature=1.0, seed=s, **params), [1]) for s in range(200)]
    choices = sample(torch.tensor([LOGITS] * len(rows)), rows)
    drawn = {c.token_id for c in choices}
    assert drawn == allowed


def test_seeded_rows_are_reproducible_whatever_the_batch():
    params = SamplingParams(temperature=1.0, seed=1234, top_p=0.9, top_k=4)
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))

    def run(batch_rows):
        rows = [new_row(params, [1])] + [new_row(SamplingParams(temperature=0.7, seed=i), [1])
                                          for i in range(batch_rows)]
        return [sample(logits[: len(rows)], rows)[0].token_id for _ in range(8)]

    assert run(0) == run(5)


def test_logprobs_are_of_the_raw_logits():
    row = new_row(SamplingParams(temperature=0, logprobs=True, top_logprobs=2,
                                 logit_bias={3: 50.0}), [1])
    choice = sample(torch.tensor([LOGITS]), [row])[0]
    raw = torch.log_softmax(torch.tensor(LOGITS), -1)
    assert choice.token_id == 3
    assert choice.logprob == pytest.approx(float(raw[3]))
    assert list(choice.top_logprobs) == [0, 1]


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
    ("top_k", -2), ("min_p", 1.5), ("logit_bias", {999: 1.0}), ("logit_bias", {1: 101.0}),
])
def test_check_params_names_the_bad_field(field, value):
    with pytest.raises(InvalidInput) as info:
        check_params(SamplingParams(**{field: value}), vocab_size=5)
    assert info.value.param == field


# -- grammar rows ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammars(formatter):
    return formatter.grammars


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "rank": {"type": "integer"}},
          "required": ["city", "rank"], "additionalProperties": False}


@pytest.mark.parametrize("padding", [0, 64])
def test_grammar_rows_produce_schema_valid_json_beside_free_rows(grammars, formatter, padding):
    """Random logits (the worst possible model) still give valid JSON on constrained rows."""
    import jsonschema

    constraint = grammars.json_schema(SCHEMA, param="response_format.json_schema.schema")
    width = constraint.vocab_size + padding
    stops = formatter.stop_token_ids
    gen = torch.Generator().manual_seed(7)
    rows = [new_row(SamplingParams(temperature=0.8, seed=i, stop_token_ids=stops,
                                   constraint=constraint if i % 2 == 0 else None), [1])
            for i in range(4)]
    finished: dict[int, list[int]] = {}
    for _ in range(200):
        live = [i for i in range(4) if i not in finished]
        if not live:
            break
        logits = torch.randn(len(live), width, generator=gen) * 3
        if padding:
            logits[:, -padding:] = 50.0  # padded columns must never be chosen on grammar rows
        for i, choice in zip(live, sample(logits, [rows[i] for i in live]), strict=True):
            if choice.token_id in stops or len(rows[i].generated) >= 120:
                finished[i] = rows[i].generated[:-1] if choice.token_id in stops \
                    else rows[i].generated
    for i in (0, 2):
        text = formatter.tokenizer.decode(finished[i])
        assert rows[i].generated[-1] in stops, text  # the grammar ended the row
        jsonschema.validate(json.loads(text), SCHEMA)
        assert rows[i].matcher.rejected == 0
    assert any(t >= constraint.vocab_size for i in (1, 3) for t in rows[i].generated) == bool(
        padding)


def test_schema_compiled_once_and_cached(grammars):
    first = grammars.json_schema(SCHEMA, param="p")
    again = grammars.json_schema(json.loads(json.dumps(SCHEMA)), param="q")
    assert first is again


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "strin"}, "not a valid JSON Schema"),
    ({"type": "string", "pattern": "(?<=a)b"}, "cannot be enforced"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "cannot be enforced"),
    ("not a schema", "must be a JSON Schema object"),
    (json.loads("[" * 0 + '{"type": "object"' + ', "properties": {"a": {"type": "object"' * 40
                + "}}" * 40 + "}"), "levels deep"),
])
def test_refused_schemas_name_the_path(grammars, schema, words):
    with pytest.raises(InvalidInput) as info:
        grammars.json_schema(schema, param="response_format.json_schema.schema")
    assert info.value.param == "response_format.json_schema.schema"
    assert words in info.value.message
    assert ".cc:" not in info.value.message
