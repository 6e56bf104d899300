"""Training on the base's own template per family: assistant-only masks and Gemma's system rule.

The templates are the families' formats (ChatML, Llama-3, Gemma 2 without a system role, Phi-3),
taken from `tests.export.test_templates`. For each, the assistant-only training copy must render
the same text; a system turn Gemma 2 refuses is folded into the first user turn (Gemma 3's own
convention) and others are left alone.
"""

from __future__ import annotations

import pytest

from tests.export.test_templates import CHATML, GEMMA, GEMMA_NO_SYSTEM, LLAMA3, PHI3
from train.template import (
    add_generation_markers,
    check_same_rendering,
    fold_system_turn,
    refuses,
    render,
)

SYSTEM_CHAT = [{"role": "system", "content": "Answer in JSON."},
               {"role": "user", "content": "Name: Ada, age 36"},
               {"role": "assistant", "content": '{"name": "Ada", "age": 36}'}]


@pytest.mark.parametrize("template", [CHATML, LLAMA3, GEMMA, GEMMA_NO_SYSTEM, PHI3],
                         ids=["chatml", "llama3", "gemma", "gemma-no-system", "phi3"])
def test_assistant_only_copy_renders_the_same_for_each_family(template):
    training = add_generation_markers(template)
    check_same_rendering(template, training)  # skips samples the base itself refuses


def test_a_system_turn_gemma_2_refuses_is_folded_into_the_first_user_turn():
    assert refuses(GEMMA_NO_SYSTEM, SYSTEM_CHAT)
    folded = fold_system_turn(GEMMA_NO_SYSTEM, SYSTEM_CHAT)
    assert [m["role"] for m in folded] == ["user", "assistant"]
    assert folded[0]["content"] == "Answer in JSON.\n\nName: Ada, age 36"
    # The same text Gemma's own system handling (first user prefix) renders.
    assert render(GEMMA_NO_SYSTEM, folded, bos_token="<bos>") == render(
        GEMMA, SYSTEM_CHAT, bos_token="<bos>")


@pytest.mark.parametrize("template", [CHATML, LLAMA3, GEMMA, PHI3])
def test_templates_that_take_a_system_turn_keep_it(template):
    assert not refuses(template, SYSTEM_CHAT)
    assert fold_system_turn(template, SYSTEM_CHAT) == SYSTEM_CHAT
