"""``tool_choice: "auto"`` through the official openai SDK, for each tool-call format.

The fake engine replays scripted token ids (the real SmolLM2 tokenizer's ids of what a Hermes,
Mistral or Llama-3 model writes), so the HTTP layer's parsing and SSE deltas are tested exactly;
the openai client talks to the app in-process (FastAPI's TestClient is an httpx client). The
real model's forced calls are in test_api_structured.py.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from fastapi.testclient import TestClient

from serve.http.app import create_app
from tests.serve.helpers import fake_state

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {
    "hermes": "{% if tools %}<tools>{{ tools | tojson }}</tools> Answer with <tool_call>{...}"
              "</tool_call>.{% endif %}" + CHATML,
    "mistral": "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS] "
               "[TOOL_CALLS]{% endif %}" + CHATML,
    "json": '{% if tools %}{{ tools | tojson }} Respond as {"name": ..., "parameters": ...}.'
            "{% endif %}" + CHATML,
}
OUTPUTS = {
    "hermes": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
              '{"city": "Paris"}}\n</tool_call>',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
}
CONTENT = {"hermes": "Let me look.", "mistral": None, "json": None}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def adapters(module_store, adapter_factory, tmp_path_factory):
    for fmt, template in TEMPLATES.items():
        folder = tmp_path_factory.mktemp(fmt) / "adapter"
        shutil.copytree(adapter_factory(seed=1), folder)
        (folder / "chat_template.jinja").write_text(template)
        module_store.register(folder, f"tools-{fmt}")
    return module_store


@pytest.mark.parametrize("fmt", list(TEMPLATES))
def test_auto_tool_calls_parsed_and_streamed_as_the_sdk_expects(adapters, formatter, fmt):
    ids = formatter.tokenizer(OUTPUTS[fmt], add_special_tokens=False)["input_ids"]
    script = ",".join(map(str, [*ids, formatter.stop_token_ids[0]]))
    state = fake_state(adapters, formatter, script=script)
    with TestClient(create_app(state)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none",
                               http_client=http, max_retries=0)
        kwargs = dict(model=f"smollm2+tools-{fmt}", tools=TOOLS, max_tokens=len(ids) + 4,
                      messages=[{"role": "user", "content": "Weather in Paris?"}])
        whole = client.chat.completions.create(**kwargs).choices[0]
        with client.chat.completions.stream(**kwargs) as stream:
            streamed = stream.get_final_completion().choices[0]
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert call.id.startswith("call_")
    assert whole.message.content == CONTENT[fmt]
    assert (streamed.message.content or None) == CONTENT[fmt]


def test_auto_plain_answer_is_content(adapters, formatter):
    ids = formatter.tokenizer("It is sunny in Paris.", add_special_tokens=False)["input_ids"]
    state = fake_state(adapters, formatter, script=",".join(map(str, ids)))
    with TestClient(create_app(state)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none",
                               http_client=http, max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2+tools-hermes", tools=TOOLS, max_tokens=len(ids),
            messages=[{"role": "user", "content": "Weather?"}], stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)
    assert text == "It is sunny in Paris."
