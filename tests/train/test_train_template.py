"""The training copy of the chat template renders byte-identical to the base's and masks only
the assistant's tokens (content and end-of-turn), which is what assistant-only loss trains on."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.errors import Unsupported
from train.template import (
    SAMPLE_CONVERSATIONS,
    add_generation_markers,
    check_same_rendering,
    has_generation_markers,
    render,
)

CONVERSATIONS = [
    *SAMPLE_CONVERSATIONS,
    [{"role": "user", "content": "Café ñ 日本 \U0001f600"}, {"role": "assistant", "content": ""}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def base_template(base_info) -> str:
    return (Path(base_info.path) / "chat_template.jinja").read_text()


def test_base_template_has_no_markers_and_the_copy_has_them(base_template):
    assert not has_generation_markers(base_template)
    training = add_generation_markers(base_template)
    assert has_generation_markers(training)
    assert add_generation_markers(training) == training  # already marked: unchanged


@pytest.mark.parametrize("add_prompt", [False, True])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_training_copy_renders_byte_identical(base_template, index, add_prompt):
    training = add_generation_markers(base_template)
    messages = CONVERSATIONS[index]
    original = render(base_template, messages, add_generation_prompt=add_prompt)
    derived = render(training, messages, add_generation_prompt=add_prompt)
    assert derived.encode() == original.encode()


def test_assistant_mask_covers_exactly_assistant_content_and_end_token(base_info, base_template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_info.path)
    training = add_generation_markers(base_template)
    messages = CONVERSATIONS[2]  # two assistant turns
    out = tokenizer.apply_chat_template(
        messages, chat_template=training, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    plain = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == plain  # same tokens as the base template
    masked = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    expected = "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
    assert masked == expected
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "<|im_start|>assistant\n" in unmasked and "two\nlines" in unmasked


@pytest.mark.parametrize(
    "template",
    [
        "{%- for message in messages %}\n  {{- '<s>' + message.role + ': ' + message.content"
        " + '</s>' -}}\n{% endfor %}",
        "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}",
        '{% for msg in messages %}{{ "[" + msg["role"] + "]" + msg["content"] }}\n{% endfor %}'
        "{% if add_generation_prompt %}[assistant]{% endif %}",
        "{% for message in messages %}{{ '<' + message['role'] + '>' + message['content'] | trim"
        " + '<end>' }}{% endfor %}",
    ],
    ids=["trim-markers", "content-only", "double-quotes", "filter"],
)
def test_other_template_shapes_render_the_same(template):
    training = add_generation_markers(template)
    assert has_generation_markers(training)
    check_same_rendering(template, training, CONVERSATIONS)


def test_a_template_that_prints_content_another_way_is_refused():
    template = "{% for message in messages %}{% set c = message.content %}{{ c }}{% endfor %}"
    with pytest.raises(Unsupported) as info:
        add_generation_markers(template)
    assert "assistant_only_loss: false" in info.value.fix
