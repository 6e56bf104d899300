"""Training on the base's own template per family: assistant-only masks and Gemma's system rule.

The templates are the families' formats (ChatML, Llama-3, Mistral, Qwen, Gemma 2 without a
system role, Phi-3), from `tests.chat_formats`. For each, the assistant-only training copy must
render the same text and mark every answer; a system turn Gemma 2 refuses is folded into the
first user turn (Gemma 3's own convention) and others are left alone, and the server folds a
recipe's system prompt on a Gemma 2 base exactly as training did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hub.errors import Unsupported
from tests.chat_formats import (
    CHATML,
    GEMMA,
    GEMMA2,
    GEMMA_NO_SYSTEM,
    LLAMA3,
    MISTRAL_FIRST,
    PHI3,
    QWEN2,
)
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


FAMILY_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL_FIRST, "qwen2": QWEN2,
                    "gemma": GEMMA, "gemma-no-system": GEMMA_NO_SYSTEM, "gemma2": GEMMA2,
                    "phi3": PHI3}


@pytest.mark.parametrize("template", list(FAMILY_TEMPLATES.values()), ids=list(FAMILY_TEMPLATES))
def test_assistant_only_copy_renders_the_same_for_each_family(template):
    training = add_generation_markers(template)
    check_same_rendering(template, training)  # also: every answer lies in a generation block


def test_a_copy_that_marks_no_answer_is_refused():
    # Phi-3 prints content in one branch per role: marking only the first (the system's) would
    # train on nothing; every content expression is marked, and a copy missing the answers fails.
    marked = add_generation_markers(PHI3)
    assert marked.count("{% generation %}") == 3
    unmarked = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(Unsupported, match="does not mark the answers"):
        check_same_rendering(PHI3, unmarked)


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


SYSTEM = "You turn one sentence about a person into JSON."
USER = "Tomás, 52, moved from Porto to Vienna."


def test_train_and_serve_fold_a_recipe_system_prompt_alike_on_gemma_2(tmp_path, base_info):
    """Gemma 2 refuses a system turn: training folds the recipe's, and so must the server."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hub.store import Store
    from serve.chat import Formatter
    from tests.conftest import TEST_CACHE
    from tests.factories import make_lora
    from tests.modelcards.conftest import make_manifest
    from tests.tiny_models import ALL_LINEAR, make_tiny_base
    from train.data import read_split
    from train.recipe import build_recipe
    from train.run import _prepare_data

    path = make_tiny_base("gemma2", tmp_path / "gemma2", Path(base_info.path))
    store = Store(tmp_path / "home", cache=TEST_CACHE / "bases")
    base = store.add_base("tiny-gemma2", path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == GEMMA2
    # -- training: the prepared row, the recipe's system prompt folded into the user turn.
    rows = [{"messages": [{"role": "user", "content": f"{USER} ({i})"},
                          {"role": "assistant", "content": '{"name": "Tomás"}'}]}
            for i in range(3)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    recipe = build_recipe({"data": str(data), "output": str(tmp_path / "out"),
                           "system_prompt": SYSTEM, "splits": [0.34, 0.33, 0.33]})
    _prepare_data(recipe, tokenizer, tmp_path / "prepared")
    row = read_split(tmp_path / "prepared" / "train.jsonl")[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][0]["content"].startswith(SYSTEM + "\n\n")
    trained_text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    train_prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False,
                                                 add_generation_prompt=True)
    assert trained_text.startswith(train_prompt) and train_prompt.startswith("<bos>")
    user = row["messages"][0]["content"][len(SYSTEM) + 2:]
    request = [{"role": "user", "content": user}]  # what an app sends

    # -- serving: an adapter whose manifest records the system prompt.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    folder = make_lora(model, tmp_path / "adapter", r=4, targets=ALL_LINEAR["gemma2"], seed=1)
    (folder / "chat_template.jinja").write_text(GEMMA2)
    make_manifest(base, extra={"system_prompt": SYSTEM}).write(folder)
    record = store.register(folder, "system-demo", base="tiny-gemma2")
    formatter = Formatter(base)
    served = formatter.render_chat(request, record)
    assert served.encode() == train_prompt.encode()
    # An app's own system message is folded by the same rule (not refused with a 400).
    own = formatter.render_chat([{"role": "system", "content": SYSTEM}, *request], None)
    assert own.encode() == train_prompt.encode()
    shutil.rmtree(tmp_path / "prepared")
