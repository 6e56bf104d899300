"""The HTTP layer's side of issue 14, on the fake engine: fields accepted and passed through.

What reaches the engine is observable on `FakeEngine.requests`: the sampling parameters each
field becomes, ``n`` fan-out with ``seed + i``, batched completion prompts, and vLLM's runtime
LoRA routes with the admin key. The generation itself is tested on the real model in
test_api_structured.py and test_api_sampling.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serve.http.app import create_app
from serve.http.auth import ApiKeys
from tests.serve.helpers import chat_body, check_envelope, fake_state

ADMIN = "sk-admin-fields-0123456789"
USER = "sk-user-fields-0123456789"


@pytest.fixture(scope="module")
def app(module_store, formatter, adapter_factory, tmp_path_factory):
    module_store.register(adapter_factory(seed=1), "fields")
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(f"{ADMIN}: {{name: ops, admin: true}}\n{USER}: {{name: app}}\n")
    state = fake_state(module_store, formatter, keys=ApiKeys.load(keys), max_running=8,
                       max_queue=32)
    with TestClient(create_app(state)) as client:
        client.headers["Authorization"] = f"Bearer {USER}"
        yield client, state


def _last(state, count: int = 1):
    return state.engine.requests[-count:]


def test_compatibility_and_vllm_fields_reach_the_sampling_params(app):
    client, state = app
    body = chat_body(
        metadata={"team": "qa"}, store=False, user="u1", parallel_tool_calls=True,
        prompt_cache_key="conv-7", safety_identifier="hash-1", presence_penalty=0.5,
        frequency_penalty=-0.25, repetition_penalty=1.2, top_k=40, min_p=0.05,
        logit_bias={"42": 3, "7": -100}, seed=9, temperature=0.7,
        messages=[{"role": "system", "content": "Be short."},
                  {"role": "user", "content": "Hi", "name": "ann"}])
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    (request,) = _last(state)
    p = request.params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.25, 1.2)
    assert (p.top_k, p.min_p, p.seed, p.temperature) == (40, 0.05, 9, 0.7)
    assert p.logit_bias == {42: 3.0, 7: -100.0}
    assert p.constraint is None


def test_n_fans_out_with_seed_plus_i_and_usage_counts_the_prompt_once(app):
    client, state = app
    response = client.post("/v1/chat/completions", json=chat_body(n=3, seed=100,
                                                                  temperature=1.0))
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    requests = _last(state, 3)
    assert sorted(r.params.seed for r in requests) == [100, 101, 102]
    assert len({r.request_id for r in requests}) == 3
    prompt = len(requests[0].prompt_ids)
    assert body["usage"]["prompt_tokens"] == prompt
    assert body["usage"]["completion_tokens"] == 3 * 4


def test_n_streams_every_choice_with_its_index(app):
    client, _ = app
    with client.stream("POST", "/v1/chat/completions",
                       json=chat_body(n=2, seed=1, stream=True,
                                      stream_options={"include_usage": True})) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    import json

    events = [json.loads(line[6:]) for line in lines]
    finishes = {c["index"]: c["finish_reason"] for e in events for c in e["choices"]
                if c["finish_reason"]}
    assert finishes == {0: "length", 1: "length"}
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_completions_take_a_batch_of_prompts_and_token_arrays(app):
    client, state = app
    response = client.post("/v1/completions", json={
        "model": "smollm2", "prompt": ["one", [1, 2, 3], "three"], "max_tokens": 2, "n": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    requests = _last(state, 6)
    assert [r.prompt_ids for r in requests][2:4] == [[1, 2, 3], [1, 2, 3]]
    assert body["usage"]["completion_tokens"] == 12


def test_json_schema_and_json_object_send_a_compiled_constraint(app):
    client, state = app
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.post("/v1/chat/completions", json=chat_body(response_format={
        "type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}}))
    (request,) = _last(state)
    assert request.params.constraint.kind == "json_schema"
    assert request.params.constraint.schema == schema
    client.post("/v1/chat/completions", json=chat_body(
        content="Answer in JSON.", response_format={"type": "json_object"}))
    (request,) = _last(state)
    assert request.params.constraint.kind == "json_object"


def test_vllm_runtime_lora_routes(app):
    client, state = app
    admin = {"Authorization": f"Bearer {ADMIN}"}
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "fields",
                                                           "lora_path": "fields"}, headers=admin)
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'fields' added successfully."
    assert "fields@1" in state.engine.resident
    response = client.post("/v1/unload_lora_adapter", json={"lora_name": "smollm2+fields"},
                           headers=admin)
    assert response.status_code == 200 and "removed successfully" in response.text
    assert "fields@1" not in state.engine.resident
    check_envelope(client.post("/v1/unload_lora_adapter", json={"lora_name": "fields"},
                               headers=admin), 404, "lora_name")
    check_envelope(client.post("/v1/load_lora_adapter", json={"lora_name": "fields",
                                                              "lora_path": "/tmp/x"},
                               headers=admin), 400, "lora_path")
    check_envelope(client.post("/v1/load_lora_adapter", json={"lora_name": "../../etc"},
                               headers=admin), 400, code="invalid_name")
    check_envelope(client.post("/v1/load_lora_adapter", json={"lora_name": "nope"},
                               headers=admin), 404)
    check_envelope(client.post("/v1/load_lora_adapter", json={"lora_name": "fields"}), 403)
