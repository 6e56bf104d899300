"""HTTP layer with the FakeEngine: SSE framing, stream == non-stream, stops, logprobs, models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hub.store import Store
from serve.http.app import create_app
from serve.http.protocol import ChatCompletion, ChatCompletionChunk, Completion, ModelList
from tests.factories import set_base_reference
from tests.serve.helpers import (
    chat_body,
    check_envelope,
    fake_state,
    sse_events,
)


def _client(store, fmt, **options):
    return TestClient(create_app(fake_state(store, fmt, **options)))


def _script(fmt, text: str, eos: bool = True) -> str:
    ids = fmt.tokenizer(text, add_special_tokens=False)["input_ids"]
    if eos:
        ids.append(fmt.stop_token_ids[0])
    return ",".join(map(str, ids))


def _stream(client, path: str, body: dict) -> tuple[str, list]:
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response.text, sse_events(response.text.splitlines())


def test_sse_framing_and_stream_equals_non_stream(module_store, formatter):
    with _client(module_store, formatter) as client:
        body = chat_body(max_tokens=6, stream_options=None)
        whole = client.post("/v1/chat/completions", json=body).json()
        ChatCompletion.model_validate(whole)
        raw, events = _stream(client, "/v1/chat/completions",
                              {**body, "stream_options": {"include_usage": True}})
    # framing: every event is one "data: ..." line followed by a blank line; [DONE] last
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1])
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole["choices"][0]["message"]["content"] and text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    # include_usage: usage null on every chunk but the last, which has no choices
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 6


def test_completions_stream_and_legacy_logprobs(module_store, formatter):
    with _client(module_store, formatter) as client:
        body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 5, "logprobs": 2}
        whole = client.post("/v1/completions", json=body).json()
        Completion.model_validate(whole)
        _, events = _stream(client, "/v1/completions", body)
    choice = whole["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    offsets = [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(logprobs["tokens"]))]
    assert logprobs["text_offset"] == offsets
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_text_and_aborts_engine(module_store, formatter):
    script = _script(formatter, "Hello world. STOP and more text after", eos=False)
    state = fake_state(module_store, formatter, script=script)
    with TestClient(create_app(state)) as client:
        body = chat_body(max_tokens=30, stop=["STOP", "zzz"])
        whole = client.post("/v1/chat/completions", json=body).json()
        _, events = _stream(client, "/v1/chat/completions", body)
    assert whole["choices"][0]["message"]["content"] == "Hello world. "
    assert whole["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert streamed == "Hello world. "
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert len(state.engine.aborted) == 2 and state.engine.running == 0


def test_stop_token_ends_with_stop_and_is_not_shown(module_store, formatter):
    script = _script(formatter, "Short answer.")
    with _client(module_store, formatter, script=script) as client:
        whole = client.post("/v1/chat/completions", json=chat_body(max_tokens=30)).json()
    assert whole["choices"][0]["message"]["content"] == "Short answer."
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == len(script.split(","))


def test_streamed_utf8_is_never_split(module_store, formatter):
    text = "🦙🦙 ça 中文 👩‍👩‍👧"
    with _client(module_store, formatter, script=_script(formatter, text)) as client:
        _, events = _stream(client, "/v1/chat/completions",
                            chat_body(max_tokens=40, logprobs=True, top_logprobs=3))
    deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1]]
    deltas = [d for d in deltas if d]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # logprob entries' bytes add up to the text, token by token
    entries = [x for e in events[:-1] if e["choices"][0]["logprobs"]
               for x in e["choices"][0]["logprobs"]["content"]]
    assert bytes(b for x in entries for b in x["bytes"]) == text.encode("utf-8")
    assert all(len(x["top_logprobs"]) == 3 for x in entries)


def test_json_object_output_is_checked(module_store, formatter):
    ask = [{"role": "user", "content": "Answer in JSON."}]
    for text, valid in (('{"answer": 4}', True), ("four", False)):
        state = fake_state(module_store, formatter, script=_script(formatter, text))
        with TestClient(create_app(state)) as client:
            body = chat_body(messages=ask, max_tokens=20,
                             response_format={"type": "json_object"})
            whole = client.post("/v1/chat/completions", json=body).json()
            assert whole["choices"][0]["json_valid"] is valid
            assert whole["choices"][0]["message"]["content"] == text
            _, events = _stream(client, "/v1/chat/completions", body)
            assert events[-2]["choices"][0]["json_valid"] is valid
            metric = f"loradock_json_invalid_total {0 if valid else 2}"
            assert metric in client.get("/metrics").text


def test_model_field_reports_pinned_version_and_follows_new_versions(
    module_store: Store, formatter, adapter_factory
):
    module_store.register(adapter_factory(seed=1), "swap")
    with _client(module_store, formatter) as client:
        first = client.post("/v1/chat/completions", json=chat_body("smollm2+swap")).json()
        assert first["model"] == "smollm2+swap@1"
        module_store.register(adapter_factory(seed=2), "swap")
        second = client.post("/v1/chat/completions", json=chat_body("smollm2+swap")).json()
        assert second["model"] == "smollm2+swap@2"
        pinned = client.post("/v1/chat/completions", json=chat_body("smollm2+swap@1")).json()
        assert pinned["model"] == "smollm2+swap@1"
        assert second["choices"][0]["message"] != first["choices"][0]["message"]
        assert pinned["choices"][0]["message"] == first["choices"][0]["message"]


def test_models_list_and_admin_routes(module_store: Store, formatter, adapter_factory):
    module_store.register(adapter_factory(seed=3), "parent-a")
    module_store.register(adapter_factory(seed=4), "child-b", parent="parent-a@1")
    state = fake_state(module_store, formatter)
    with TestClient(create_app(state)) as client:
        listing = client.get("/v1/models").json()
        ModelList.model_validate(listing)
        cards = {c["id"]: c for c in listing["data"]}
        assert cards["smollm2"]["parent"] is None and cards["smollm2"]["root"] == "smollm2"
        assert cards["smollm2+parent-a"]["parent"] == "smollm2"
        assert cards["smollm2+child-b"]["parent"] == "smollm2+parent-a@1"
        assert cards["smollm2+child-b"]["version"] == 1
        one = client.get("/v1/models/smollm2+child-b@1").json()
        assert one["id"] == "smollm2+child-b@1" and one["version"] == 1
        check_envelope(client.get("/v1/models/smollm2+nope"), 404, "model", "model_not_found")

        loaded = client.post("/v1/adapters/parent-a/load").json()
        assert loaded["id"] == "smollm2+parent-a@1" and loaded["loaded"] is True
        assert "parent-a@1" in client.get("/health").json()["resident_adapters"]
        assert "loradock_adapters_resident 1" in client.get("/metrics").text
        assert client.delete("/v1/adapters/parent-a").json()["unloaded"] == ["parent-a@1"]
        assert client.get("/health").json()["resident_adapters"] == []
        assert client.delete("/v1/adapters/parent-a@1").json()["unloaded"] == []
        check_envelope(client.post("/v1/adapters/nope/load"), 404, code="model_not_found")
        check_envelope(client.post("/v1/adapters/..evil/load"), 400, "name", "invalid_name")
        check_envelope(client.post("/v1/adapters/..%2F..%2Fetc/load"), 404)
        check_envelope(client.post("/v1/adapters/parent-a@x/load"), 400, code="invalid_name")


def test_metrics_exposition_format(module_store, formatter):
    with _client(module_store, formatter) as client:
        client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
        client.post("/v1/chat/completions", json=chat_body(n=20))
        text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert samples['loradock_requests_total{route="/v1/chat/completions",status="200"}'] == 1
    assert samples['loradock_requests_total{route="/v1/chat/completions",status="400"}'] == 1
    assert samples["loradock_completion_tokens_total"] >= 3
    assert samples["loradock_time_to_first_token_seconds_count"] >= 1
    assert samples['loradock_time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1
    assert samples['loradock_engine_status{status="ok"}'] == 1
    for name in ("queue_depth", "running_requests", "adapters_resident",
                 "adapter_load_seconds", "time_to_first_token_seconds"):
        assert f"# TYPE loradock_{name} " in text
    json.dumps(samples)  # all values are plain numbers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_seed_and_temperature_reach_the_engine(module_store, formatter, path):
    state = fake_state(module_store, formatter)
    with TestClient(create_app(state)) as client:
        body = ({"model": "smollm2", "prompt": "x"} if path == "/v1/completions"
                else chat_body())
        body.update(temperature=0.7, top_p=0.9, seed=123, max_tokens=3)
        assert client.post(path, json=body).status_code == 200
    params = state.engine.requests[-1].params
    assert (params.temperature, params.top_p, params.seed, params.max_tokens) == (0.7, 0.9, 123, 3)
    assert params.stop_token_ids == formatter.stop_token_ids


def test_adapter_of_another_base(module_store: Store, formatter, adapter_factory, base_info,
                                 tmp_path):
    module_store.add_base("otherbase", Path(base_info.path))
    folder = tmp_path / "foreign"
    shutil.copytree(adapter_factory(seed=1), folder)
    set_base_reference(folder, "otherbase")
    module_store.register(folder, "foreign", base="otherbase")
    with _client(module_store, formatter) as client:
        check_envelope(client.post("/v1/chat/completions", json=chat_body("smollm2+foreign")),
                       400, "model", "incompatible_adapter")
        # a base this server does not serve is simply not found here
        check_envelope(client.post("/v1/chat/completions", json=chat_body("otherbase+foreign")),
                       404, "model", "model_not_found")
        check_envelope(client.post("/v1/adapters/foreign/load"), 400, "name",
                       "incompatible_adapter")
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert not any("foreign" in i or "otherbase" in i for i in ids)
