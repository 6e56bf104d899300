"""`serve.tools` on strings: templates' tools support, call parsing per format, streaming holds.

Table-driven: real template fragments of each family (as the format is taught to the model) and
model outputs, with the content and calls each must give. The end-to-end path (rendering,
constrained calls, SSE deltas through the openai SDK) is in test_api_structured.py.
"""

from __future__ import annotations

import json

import pytest

from serve.http.chat import ChoiceText
from serve.http.structured import ToolPlan
from serve.tools import (
    forced_calls,
    may_start_call,
    parse_calls,
    required_schema,
    template_format,
    template_messages,
    template_supports_tools,
)

QWEN = ('{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>'
        '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>'
        '{%- endif %}{% for m in messages %}{{ m.content }}{% endfor %}')
MISTRAL = ('{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}'
           '{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}'
           '{% endif %}{{ m.content }}{% endfor %}')
LLAMA3 = ('{%- if tools is not none %}Respond in the format {"name": function name, '
          '"parameters": dictionary of argument name and its value}.{{ tools | tojson }}'
          '{%- endif %}{% for m in messages %}{{ m.content }}{% endfor %}')
PLAIN = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize(("template", "supports", "fmt"), [
    (QWEN, True, "hermes"), (MISTRAL, True, "mistral"), (LLAMA3, True, "json"),
    (PLAIN, False, "json"), ("{% generation %}{{ tools }}{% endgeneration %}", True, "json"),
])
def test_template_support_and_format(template, supports, fmt):
    assert template_supports_tools(template) is supports
    assert template_format(template) == fmt


W = {"city": "Paris"}
# (id, format, model output, content, [(name, arguments)])
PARSE_CASES = [
    ("hermes-one", "hermes", '<tool_call>\n{"name": "w", "arguments": {"city": "Paris"}}\n'
     "</tool_call>", None, [("w", W)]),
    ("hermes-two-with-text", "hermes", 'Let me check.\n<tool_call>{"name": "w", "arguments": '
     '{"city": "Paris"}}</tool_call>\n<tool_call>{"name": "t", "arguments": {}}</tool_call>',
     "Let me check.", [("w", W), ("t", {})]),
    ("hermes-unclosed-at-stop", "hermes", '<tool_call>{"name": "w", "arguments": {"city": '
     '"Paris"}}', None, [("w", W)]),
    ("hermes-string-arguments", "hermes", '<tool_call>{"name": "w", "arguments": '
     '"{\\"city\\": \\"Paris\\"}"}</tool_call>', None, [("w", W)]),
    ("hermes-broken-json-is-text", "hermes", "<tool_call>{not json}</tool_call>",
     "<tool_call>{not json}</tool_call>", []),
    ("hermes-no-call", "hermes", "It is sunny.", "It is sunny.", []),
    ("mistral-array", "mistral", '[TOOL_CALLS][{"name": "w", "arguments": {"city": "Paris"}}]',
     None, [("w", W)]),
    ("mistral-v11", "mistral", '[TOOL_CALLS]w[ARGS]{"city": "Paris"}', None, [("w", W)]),
    ("llama3-parameters", "json", '{"name": "w", "parameters": {"city": "Paris"}}', None,
     [("w", W)]),
    ("llama3-python-tag-and-two", "json", '<|python_tag|>{"name": "w", "parameters": {"city": '
     '"Paris"}}; {"name": "t", "parameters": {}}', None, [("w", W), ("t", {})]),
    ("json-plain-text", "json", "Paris is sunny.", "Paris is sunny.", []),
    ("json-object-without-name", "json", '{"city": "Paris"}', '{"city": "Paris"}', []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), [c[1:] for c in PARSE_CASES],
                         ids=[c[0] for c in PARSE_CASES])
def test_parse_calls(fmt, text, content, calls):
    got_content, got = parse_calls(text, fmt)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize(("fmt", "text", "held_from"), [
    ("hermes", "Sure <tool_", 5), ("hermes", "Sure <tool_call>{", 5), ("hermes", "a < b", 5),
    ("mistral", "[TOOL_C", 0), ("json", "  {", 2), ("json", "The answer", 10), ("json", " ", 0),
])
def test_streaming_holds_back_what_may_start_a_call(fmt, text, held_from):
    assert may_start_call(text, fmt) == held_from


def test_streamed_choice_text_sends_content_then_the_call():
    plan = ToolPlan([{"type": "function", "function": {"name": "w"}}], "auto")
    choice = ChoiceText(plan, "hermes", raw=lambda: "")
    sent = "".join(choice.push(piece) for piece in
                   ["Checking", " now <", "tool_call>", '{"name": "w", "arguments": {}}',
                    "</tool_call>"])
    rest, calls = choice.rest()
    assert sent + rest == "Checking now"  # as the non-streamed content (stripped)
    assert [(c.name, c.arguments) for c in calls] == [("w", "{}")]


def test_forced_calls_and_required_schema():
    tools = [{"type": "function", "function": {"name": "w", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "t"}}]
    assert required_schema(tools, parallel=True)["maxItems"] == 2
    schema = required_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert schema["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object",
                                                                      "properties": {}}
    calls = forced_calls('[{"name": "w", "arguments": {"city": "Rome"}}]', None)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("w", {"city": "Rome"})]
    (named,) = forced_calls('{"city": "Rome"}', "w")
    assert named.name == "w" and json.loads(named.arguments) == {"city": "Rome"}
    assert forced_calls('{"city": "Ro', "w") == []  # cut by max_tokens


def test_history_arguments_become_objects_for_templates():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "w",
                                                      "arguments": '{"city": "Paris"}'}}]}]
    (out,) = template_messages(messages)
    assert out["tool_calls"][0]["function"]["arguments"] == W
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
