"""One template everywhere: training, the server and the Ollama Modelfile render one prompt.

The recipe's ``system_prompt`` is added to conversations without one when the splits are
prepared (training and evaluation read them), is stored in the manifest (``extra``), is applied
by the server to requests without a system message, and is the Modelfile's ``SYSTEM``, which
Ollama puts first when a request has no system message. For one conversation, the prompt each
of the three renders is compared byte for byte, with the real SmolLM2 template and tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from export.gotemplate import render as render_go
from export.ollama import build_modelfile, recipe_system_prompt
from export.templates import ollama_values, translate
from serve.chat import Formatter
from tests.modelcards.conftest import FULL_CARD, make_manifest
from train.data import read_split
from train.publish import base_chat_template
from train.recipe import build_recipe
from train.run import _prepare_data

SYSTEM = "You turn one sentence about a person into JSON.\nKeys: name, age, city."
USER = "Tomás, 52, moved from Porto to Vienna."
ANSWER = '{"name": "Tomás", "age": 52, "city": "Vienna"}'


def test_train_serve_and_ollama_render_byte_identical_prompts(
    store, base_info, adapter_factory, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    template = base_chat_template(base_info).decode()
    tokenizer = AutoTokenizer.from_pretrained(base_info.path)
    # -- training: the prepared split row, system prompt added, rendered with the template.
    rows = [{"messages": [{"role": "user", "content": f"{USER} ({i})"},
                          {"role": "assistant", "content": ANSWER}]} for i in range(3)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    recipe = build_recipe({"data": str(data), "output": str(tmp_path / "out"),
                           "system_prompt": SYSTEM, "splits": [0.34, 0.33, 0.33]})
    _prepare_data(recipe, tokenizer, tmp_path / "prepared")
    row = read_split(tmp_path / "prepared" / "train.jsonl")[0]
    assert row["messages"][0] == {"role": "system", "content": SYSTEM}
    trained_text = tokenizer.apply_chat_template(row["messages"], chat_template=template,
                                                 tokenize=False)
    train_prompt = tokenizer.apply_chat_template(row["messages"][:-1], chat_template=template,
                                                 tokenize=False, add_generation_prompt=True)
    assert trained_text.startswith(train_prompt)
    request = [m for m in row["messages"][:-1] if m["role"] != "system"]  # what an app sends

    # -- serving: a registered adapter whose manifest records the system prompt.
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_factory(seed=5, r=4), folder)
    (folder / "chat_template.jinja").write_text(template)
    make_manifest(base_info, extra={"card": dict(FULL_CARD), "system_prompt": SYSTEM}).write(
        folder)
    record = store.register(folder, "system-demo")
    formatter = Formatter(base_info, tokenizer)
    served = formatter.render_chat(request, record)
    assert served.encode() == train_prompt.encode()
    # An explicit system message wins, as in training (no second system turn).
    own = [{"role": "system", "content": "Be brief."}, *request]
    assert formatter.render_chat(own, record).count("<|im_start|>system") == 1
    assert "Be brief." in formatter.render_chat(own, record)
    # The base alone (no adapter) has no recorded system prompt.
    assert SYSTEM not in formatter.render_chat(request, None)

    # -- Ollama: SYSTEM in the Modelfile; Ollama puts it first when the request has none.
    translation = translate(template, eos_token=tokenizer.eos_token or "")
    system = recipe_system_prompt(record.manifest)
    modelfile = build_modelfile(model_file="m.gguf", translation=translation, license="x",
                                system=system)
    assert f'SYSTEM """{SYSTEM}"""' in modelfile
    ollama = render_go(translation.go_template,
                       ollama_values([{"role": "system", "content": system}, *request]))
    assert ollama.encode() == served.encode() == train_prompt.encode()

    # -- the card says so.
    from modelcards import write_card

    card = write_card(folder, base_info, name="system-demo").path.read_text()
    assert "the loradock server applies it to requests that have no system message" in card
    assert "Modelfile's `SYSTEM`" in card and SYSTEM in card
