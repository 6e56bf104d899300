"""serve.chat with the real SmolLM2 tokenizer: exact templates, UTF-8-safe streaming, stops."""

from __future__ import annotations

import shutil

import pytest

from hub.errors import InvalidInput
from serve.chat import Detokenizer, StopMatcher

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Bonjour, ça va ?"},
        {"role": "assistant", "content": "Oui, très bien 🤗"},
        {"role": "user", "content": "日本語で答えて"},
    ],
]


def _ids(result):
    return list(result["input_ids"] if hasattr(result, "keys") else result)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_base_template_matches_apply_chat_template(formatter, messages):
    tok = formatter.tokenizer
    expected_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_ids = _ids(tok.apply_chat_template(messages, tokenize=True,
                                                add_generation_prompt=True))
    assert formatter.render_chat(messages, None) == expected_text
    assert formatter.encode_chat(messages, None) == expected_ids
    assert expected_text.endswith("<|im_start|>assistant\n")


def test_adapter_template_is_used_byte_for_byte(formatter, store, adapter_factory, tmp_path):
    folder = tmp_path / "with-template"
    shutil.copytree(adapter_factory(seed=1), folder)
    template = (
        "{% for m in messages %}[{{ m['role'] | upper }}]{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    (folder / "chat_template.jinja").write_text(template)
    with_template = store.register(folder, "templated")
    without = store.register(adapter_factory(seed=1), "plain")
    messages = CONVERSATIONS[1]
    tok = formatter.tokenizer
    expected = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=True)
    assert formatter.render_chat(messages, with_template) == expected
    assert expected.endswith("[ASSISTANT]")
    assert formatter.render_chat(messages, without) == formatter.render_chat(messages, None)


def test_template_errors_are_invalid_input(formatter, store, adapter_factory, tmp_path):
    folder = tmp_path / "strict"
    shutil.copytree(adapter_factory(seed=1), folder)
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    )
    record = store.register(folder, "strict")
    with pytest.raises(InvalidInput) as info:
        formatter.render_chat([{"role": "user", "content": "hi"}], record)
    assert info.value.param == "messages" and "system first" in info.value.message


def test_stop_token_ids_are_eos_and_im_end(formatter):
    vocab = formatter.tokenizer.get_vocab()
    assert formatter.stop_token_ids == [formatter.tokenizer.eos_token_id]
    assert vocab["<|im_end|>"] in formatter.stop_token_ids


@pytest.mark.parametrize("text", [
    "plain ascii words",
    "naïve café — déjà vu",
    "emoji 🤗🦙 and 👩‍👩‍👧 family",
    "中文字符和日本語のテキスト",
    "mixed: ℵ₀ ≠ ∞, ½ + ¼",
])
def test_detokenizer_never_splits_utf8(formatter, text):
    ids = formatter.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = formatter.detokenizer()
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == formatter.tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # token bytes add up to the text's bytes (what logprobs report)
    assert b"".join(formatter.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_detokenizer_holds_back_partial_characters(formatter):
    ids = formatter.tokenizer("🦙", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the llama emoji should take several byte tokens"
    detok = formatter.detokenizer()
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🦙"


def test_detokenizer_skips_stop_ids_and_flushes_unfinished_bytes(formatter):
    ids = formatter.tokenizer("ok 🦙", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(formatter.tokenizer, skip_ids=formatter.stop_token_ids)
    text = "".join(detok.push(i) for i in [*ids[:-1], formatter.stop_token_ids[0]])
    assert "<|im_end|>" not in text
    assert (text + detok.flush()).startswith("ok ")


@pytest.mark.parametrize(("stops", "pieces", "expected", "stopped"), [
    ([], ["ab", "c"], "abc", False),
    (["###"], ["ab#", "#", "#cd"], "ab", True),
    (["###"], ["a#", "b"], "a#b", False),
    (["END", "STOP"], ["xx S", "TO", "P yy"], "xx ", True),
    (["\n\n"], ["line\n", "\n", "next"], "line", True),
    (["abc"], ["ab"], "ab", False),  # held back, then released by flush
    (["b"], ["abc"], "a", True),
])
def test_stop_matcher(stops, pieces, expected, stopped):
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(p) for p in pieces)
    if not matcher.stopped:
        out += matcher.flush()
    assert (out, matcher.stopped) == (expected, stopped)


def test_stop_matcher_sends_nothing_that_may_start_a_stop():
    matcher = StopMatcher(["<END>"])
    assert matcher.push("hello <E") == "hello "
    assert matcher.push("N") == ""
    assert matcher.push("x") == "<ENx"
