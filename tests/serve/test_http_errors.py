"""HTTP layer with the FakeEngine: every error is an OpenAI envelope with the right status."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from hub.errors import (
    Conflict,
    EngineUnavailable,
    Incompatible,
    InvalidInput,
    NotFound,
    Overloaded,
    StoreCorrupt,
    Unsupported,
)
from serve.http.app import create_app
from tests.serve.helpers import (
    HOSTILE_BODIES,
    HOSTILE_PATHS,
    chat_body,
    check_envelope,
    fake_state,
)


@pytest.fixture
def app(module_store, formatter):
    state = fake_state(module_store, formatter, max_queue=2)
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        yield client, state


@pytest.mark.parametrize(("case", "path", "raw", "status", "param", "code"), HOSTILE_BODIES,
                         ids=[row[0] for row in HOSTILE_BODIES])
def test_hostile_bodies_get_envelopes(app, case, path, raw, status, param, code):
    client, state = app
    response = client.post(HOSTILE_PATHS[path], content=raw,
                           headers={"Content-Type": "application/json"})
    check_envelope(response, status, param, code)
    assert "detail" not in response.text[:20]
    # nothing reached the engine, and the server keeps serving
    assert state.engine.requests == []
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_error_messages_name_the_bad_value(app):
    client, _ = app
    error = check_envelope(client.post("/v1/chat/completions", json=chat_body(n=30)), 400, "n")
    assert "'n'" in error["message"] and "8" in error["message"]
    error = check_envelope(client.post("/v1/chat/completions", json=chat_body(audio={})), 400,
                           "audio")
    assert "not supported" in error["message"]
    error = check_envelope(client.post("/v1/chat/completions", json=chat_body(zzz=1, yyy=2)),
                           400, "zzz")
    assert "'zzz'" in error["message"] and "'yyy'" in error["message"]


def test_unsupported_fields_sent_as_null_count_as_absent(app):
    client, _ = app
    body = chat_body(tools=None, logit_bias=None, n=None, presence_penalty=0, n_=None)
    body.pop("n_")
    assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(("error", "status", "error_type", "code"), [
    (Overloaded("queue full", retry_after_s=3), 429, "rate_limit_error", "server_overloaded"),
    (EngineUnavailable("draining"), 503, "server_error", "engine_unavailable"),
    (Unsupported("DoRA not served"), 400, "invalid_request_error", "unsupported"),
    (Incompatible("wrong base"), 400, "invalid_request_error", "incompatible_adapter"),
    (Conflict("busy"), 409, "invalid_request_error", "conflict"),
    (NotFound("gone"), 404, "invalid_request_error", "model_not_found"),
    (StoreCorrupt("changed on disk"), 500, "server_error", "store_corrupt"),
    (InvalidInput("bad", param="prompt"), 400, "invalid_request_error", "invalid_request"),
])
def test_engine_errors_are_mapped(app, error, status, error_type, code):
    client, state = app

    def failing_generate(request):
        raise error

    state.engine.generate = failing_generate
    for stream in (False, True):
        response = client.post("/v1/chat/completions", json=chat_body(stream=stream))
        body = check_envelope(response, status, code=code)
        assert body["type"] == error_type
        if status == 429:
            assert response.headers["Retry-After"] == "3"


def test_unexpected_engine_crash_is_a_500_envelope_without_details(app):
    client, state = app

    def crashing_generate(request):
        raise RuntimeError("secret internals /etc/shadow")

    state.engine.generate = crashing_generate
    error = check_envelope(client.post("/v1/chat/completions", json=chat_body()), 500,
                           code="internal_error")
    assert "secret" not in error["message"]


def test_routing_errors_are_envelopes(app):
    client, _ = app
    check_envelope(client.get("/v1/nope"), 404, code="not_found")
    check_envelope(client.get("/v1/chat/completions"), 405, code="method_not_allowed")
    check_envelope(client.get("/no-such-page"), 404)  # /docs is served (issue 15)


def test_draining_server_answers_503(app):
    client, state = app
    state.draining = True
    check_envelope(client.post("/v1/chat/completions", json=chat_body()), 503,
                   code="engine_unavailable")
    check_envelope(client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"}), 503)
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "draining"


def test_request_timeout_is_504(module_store, formatter):
    state = fake_state(module_store, formatter, token_delay_s=0.1)
    state.request_timeout_s = 0.35
    with TestClient(create_app(state)) as client:
        check_envelope(client.post("/v1/chat/completions", json=chat_body(max_tokens=50)), 504,
                       code="timeout")
        # streamed: the error arrives as the last event, after the tokens made in time
        text = client.post("/v1/chat/completions",
                           json=chat_body(max_tokens=50, stream=True)).text
        assert '"code":"timeout"' in text.strip().splitlines()[-1]
        assert "[DONE]" not in text
        assert state.engine.running == 0
        assert "loradock_request_timeouts_total 2" in client.get("/metrics").text


def test_context_length_is_checked_against_prompt_plus_max_tokens(app):
    client, state = app  # max_model_len 256
    ok = client.post("/v1/chat/completions", json=chat_body(max_tokens=200))
    assert ok.status_code == 200
    error = check_envelope(client.post("/v1/chat/completions", json=chat_body(max_tokens=250)),
                           400, "max_completion_tokens", "context_length_exceeded")
    assert "256" in error["message"]
    long_prompt = "word " * 400
    check_envelope(client.post("/v1/chat/completions", json=chat_body(content=long_prompt)),
                   400, "messages", "context_length_exceeded")
    # without max_tokens the budget is what is left of the context
    body = chat_body()
    body.pop("max_tokens")
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert state.engine.requests[-1].params.max_tokens == 256 - len(
        state.engine.requests[-1].prompt_ids)


def test_body_size_limit_counts_bytes_without_content_length(app):
    client, state = app
    state.max_body_bytes = 4096

    def chunks():
        yield b'{"model": "smollm2", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    check_envelope(client.post("/v1/chat/completions", content=chunks()), 413,
                   code="request_too_large")
