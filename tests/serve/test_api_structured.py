"""Structured outputs, tools, ``n`` and batched prompts on the real server, with the openai SDK.

One ``loradock serve --engine peft --base-dtype fp32`` process for the module, serving the real
SmolLM2 and two real PEFT adapters: ``tooly`` carries a Hermes-style chat_template.jinja with
tools support (written below: SmolLM2's own template has none), ``plain`` the base template.
Requests that must share a batch are sent concurrently (``--max-running 8``).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from hub.store import Store
from tests.conftest import TEST_CACHE
from tests.serve.helpers import check_envelope, start_server

# ChatML (SmolLM2's format) with a Hermes/Qwen-style tools block; written for these tests.
HERMES_TEMPLATE = """\
{%- if tools -%}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call functions. Their signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each call, answer with a JSON object within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role != 'system' -%}
<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{%- if not tools %}<|im_start|>system
{{ message.content }}<|im_end|>
{% endif -%}
{%- elif message.role == 'assistant' and message.tool_calls -%}
<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                                 "maxLength": 30}},
                       "required": ["zone"], "additionalProperties": False},
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    # Bounded fields: the test adapters are random LoRA weights, and a constrained string has
    # no reason to end on a model that rambles.
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    city: str = Field(max_length=24)


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_factory):
    root = tmp_path_factory.mktemp("api-structured")
    store = Store(root / "home", cache=TEST_CACHE / "bases")
    tooly = root / "tooly"
    shutil.copytree(adapter_factory(seed=11), tooly)
    (tooly / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    store.register(tooly, "tooly")
    store.register(adapter_factory(seed=12), "plain")
    proc = start_server(store.home, engine="peft", args=[
        "--base-dtype", "fp32", "--max-running", "8", "--max-adapters", "4",
        "--max-model-len", "1024",
    ])
    yield proc
    proc.stop()


def _client(server):
    return server.client()


MODELS = ["smollm2", "smollm2+tooly", "smollm2+plain"]


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_parse_pydantic_on_base_and_two_adapters_in_one_batch(server, temperature):
    client = _client(server)

    def parse(model: str):
        return client.chat.completions.parse(
            model=model, response_format=Person, temperature=temperature, seed=5,
            max_completion_tokens=96,
            messages=[{"role": "user", "content": "Invent a person: name, age and city."}])

    with ThreadPoolExecutor(len(MODELS)) as pool:
        replies = list(pool.map(parse, MODELS))
    for model, reply in zip(MODELS, replies, strict=True):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (model, choice.message.content)
        assert isinstance(choice.message.parsed, Person), (model, choice.message.content)
        assert reply.model.partition("@")[0] == model


JSON_PROMPTS = [
    "Describe a cat in JSON.", "Give a recipe for pancakes as JSON.", "JSON please: a car.",
    "List two planets, in JSON.", "Write a JSON object about the sea.", "Tell a joke as JSON.",
    "A JSON profile of a teacher.", "Summarise the water cycle in JSON.", "A book, as JSON.",
    "JSON for a pizza order.", "Three colours in JSON.", "Your favourite song, in JSON.",
    "Weather report as JSON.", "A football team in JSON.", "Make a JSON shopping list.",
    "A city guide for Rome in JSON.", "Describe a tree using JSON.", "A movie review in JSON.",
    "JSON: a bank account.", "A short poem as a JSON object.",
]


def test_json_object_parses_for_20_of_20_prompts(server):
    client = _client(server)

    def ask(prompt: str, constrained: bool) -> str:
        extra = ({"response_format": {"type": "json_object"}, "max_tokens": 256} if constrained
                 else {"max_tokens": 24})
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompt}], temperature=0,
            **extra)
        return reply.choices[0].message.content

    def parses(text: str) -> bool:
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False

    with ThreadPoolExecutor(len(JSON_PROMPTS)) as pool:
        free = list(pool.map(lambda p: ask(p, False), JSON_PROMPTS))
        constrained = list(pool.map(lambda p: ask(p, True), JSON_PROMPTS))
    # Unprompted, the model rarely even starts a JSON object (prose, ```json fences...).
    assert sum(t.lstrip().startswith("{") for t in free) < len(JSON_PROMPTS) // 2, free
    bad = [t for t in constrained if not parses(t)]
    assert not bad, bad


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_calls_validate_against_the_function_schema(server, choice):
    tool_choice = ({"type": "function", "function": {"name": "get_weather"}}
                   if choice == "named" else "required")
    reply = _client(server).chat.completions.create(
        model="smollm2+tooly", messages=ASK_WEATHER, tools=[WEATHER, TIME],
        tool_choice=tool_choice, temperature=0, max_tokens=96)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls", message
    assert message.content is None and message.tool_calls
    call = message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    if choice == "named":
        assert call.function.name == "get_weather"
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema["function"]["parameters"])


def test_streamed_tool_calls_reassemble_to_the_non_streamed_call(server):
    client = _client(server)
    kwargs = dict(model="smollm2+tooly", messages=ASK_WEATHER, tools=[WEATHER, TIME],
                  tool_choice="required", temperature=0, max_tokens=96)
    whole = client.chat.completions.create(**kwargs).choices[0].message
    with client.chat.completions.stream(**kwargs) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.tool_calls]


def test_tool_history_renders_and_auto_answers(server):
    messages = [*ASK_WEATHER,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather",
                                 "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    reply = _client(server).chat.completions.create(
        model="smollm2+tooly", messages=messages, tools=[WEATHER], temperature=0, max_tokens=24,
        parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


def test_tools_on_a_template_without_tools_support_are_refused(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={
            "model": "smollm2+plain", "messages": ASK_WEATHER, "tools": [WEATHER]})
    error = check_envelope(response, 400, "tools")
    assert "no tools support" in error["message"]


def test_bad_tool_schema_and_missing_tool_call_id_name_the_field(server):
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={
            "model": "smollm2+tooly", "messages": ASK_WEATHER, "tools": [WEATHER, bad_tool]})
        check_envelope(response, 400, "tools[1].function.parameters")
        response = http.post("/v1/chat/completions", json={
            "model": "smollm2+tooly", "messages": [*ASK_WEATHER,
                                                   {"role": "tool", "content": "21"}]})
        check_envelope(response, 400, "messages[1].tool_call_id")


def test_n_3_gives_3_seeded_choices(server):
    client = _client(server)
    kwargs = dict(model="smollm2+plain", messages=[{"role": "user", "content": "Say a word."}],
                  n=3, temperature=1.0, seed=42, max_tokens=8)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seed + i per choice
    assert len(set(texts)) > 1


def test_batched_prompts_and_compatibility_fields(server):
    client = _client(server)
    reply = client.completions.create(model="smollm2", prompt=["The sky is", "One, two,"],
                                      max_tokens=4, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: both choices agree
    single = client.completions.create(model="smollm2", prompt="One, two,", max_tokens=4,
                                       temperature=0)
    assert reply.choices[2].text == single.choices[0].text
    chat = client.chat.completions.create(
        model="smollm2+plain", max_tokens=4, temperature=0.7, seed=1, store=False,
        user="u-1", metadata={"team": "qa"}, prompt_cache_key="k", safety_identifier="s",
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"28": -5},
        logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": "Hi", "name": "ann"}],
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    choice = chat.choices[0]
    assert choice.logprobs.content and len(choice.logprobs.content[0].top_logprobs) == 2
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=ASK_WEATHER, n=9)
    assert info.value.body["param"] == "n"


def test_server_still_healthy(server):
    assert httpx.get(server.url + "/health").status_code == 200
