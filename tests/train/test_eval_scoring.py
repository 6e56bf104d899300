"""Perplexity is computed on assistant tokens only: masks from the real template, NLL by hand."""

from __future__ import annotations

import pytest

from hub.errors import Unsupported
from train.eval.scoring import Encoded, encode_conversation, encode_text, nll_sums, shared_prefix


@pytest.fixture(scope="module")
def tokenizer(base_info):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_info.path)


def _scored_text(tokenizer, enc: Encoded) -> str:
    return tokenizer.decode([t for t, keep in zip(enc.ids, enc.scored, strict=True) if keep])


def test_only_assistant_content_and_end_of_turn_are_scored(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": '{"capital": "Paris"}'},
    ]
    enc = encode_conversation(tokenizer, messages)
    assert _scored_text(tokenizer, enc) == '{"capital": "Paris"}<|im_end|>'
    expected = len(tokenizer('{"capital": "Paris"}', add_special_tokens=False)["input_ids"]) + 1
    assert enc.scored_count == expected


def test_user_text_does_not_change_what_is_scored(tokenizer) -> None:
    answer = {"role": "assistant", "content": "Bonjour tout le monde."}
    short = encode_conversation(tokenizer, [{"role": "user", "content": "Hi"}, answer])
    long = encode_conversation(
        tokenizer,
        [
            {"role": "system", "content": "You translate into French."},
            {"role": "user", "content": "Please translate 'hello everyone' " * 5},
            answer,
        ],
    )
    assert short.scored_count == long.scored_count
    assert _scored_text(tokenizer, short) == _scored_text(tokenizer, long)
    assert len(long.ids) > len(short.ids)


def test_every_assistant_turn_is_scored_and_first_skips_earlier_ones(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "dos"},
    ]
    both = encode_conversation(tokenizer, messages)
    assert _scored_text(tokenizer, both) == "uno<|im_end|>dos<|im_end|>"
    last = encode_conversation(tokenizer, messages, first=2)
    assert _scored_text(tokenizer, last) == "dos<|im_end|>"


def test_template_that_is_not_prefix_stable_is_refused(tokenizer) -> None:
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # Renders the number of messages first: earlier turns are not a prefix of later ones.
    odd.chat_template = (
        "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(Unsupported):
        encode_conversation(
            odd, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )


def test_nll_sums_equal_a_hand_computation_over_scored_positions(tokenizer, base_model) -> None:
    import torch

    convs = [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        [
            {"role": "user", "content": "Count to five, please, with words separated by commas."},
            {"role": "assistant", "content": "one, two, three, four, five"},
        ],
    ]
    encoded = [encode_conversation(tokenizer, c) for c in convs]
    assert shared_prefix(encoded) > 8  # the default system prompt runs once, from a KV cache
    batched = nll_sums(base_model, encoded, token_budget=4096)  # both in one padded batch
    single = [nll_sums(base_model, [e])[0] for e in encoded]
    for enc, got, alone in zip(encoded, batched, single, strict=True):
        with torch.inference_mode():
            logits = base_model(input_ids=torch.tensor([enc.ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        manual = -sum(
            float(logprobs[t - 1, enc.ids[t]]) for t in range(1, len(enc.ids)) if enc.scored[t]
        )
        assert got.tokens == enc.scored_count == alone.tokens
        assert got.nll == pytest.approx(manual, rel=1e-4)
        assert alone.nll == pytest.approx(manual, rel=1e-4)  # padding does not leak


def test_plain_text_scores_every_token_but_the_first(tokenizer) -> None:
    enc = encode_text(tokenizer, "Water boils at a lower temperature on a mountain.")
    assert enc.scored[0] is False and all(enc.scored[1:])


@pytest.mark.parametrize(
    ("seqs", "expected"),
    [
        # Common ids 1,2,3; first scored token at index 3 in both: prefix may cover 0..2.
        ([([1, 2, 3, 4, 5], 3), ([1, 2, 3, 9], 3)], 2),
        ([([1, 2, 3, 4, 5], 2), ([1, 2, 3, 9], 3)], 1),  # an earlier scored token limits it
        ([([1, 2, 3], 1), ([7, 2, 3], 1)], 0),  # nothing shared
        ([([1, 2, 3, 4], 3)], 0),  # a single sequence shares with nobody
    ],
)
def test_shared_prefix(seqs: list[tuple[list[int], int]], expected: int) -> None:
    encoded = [Encoded(ids, [t >= first for t in range(len(ids))]) for ids, first in seqs]
    assert shared_prefix(encoded) == expected
