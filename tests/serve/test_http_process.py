"""A real server process with the FakeEngine: queue full -> 429, disconnects free slots, SIGTERM.

One process per module (one slot, one queue place, 50 ms per token) so that concurrency is easy to
arrange; the SIGTERM test runs last and ends it.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from serve.server import BackgroundServer, ServerConfig
from tests.serve.helpers import ServerProcess, chat_body, check_envelope, sse_events, start_server

DELAY_S = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerProcess:
    home = tmp_path_factory.mktemp("process") / "home"
    proc = start_server(home, engine="fake", args=[
        "--max-running", "1", "--max-queue", "1", "--engine-option", f"token_delay_s={DELAY_S}",
        "--drain-timeout-s", "60",
    ])
    yield proc
    proc.stop()


def _health(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def _wait(predicate, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(name)


def _background_stream(server: ServerProcess, results: list, max_tokens: int) -> threading.Thread:
    def run() -> None:
        with server.http() as client:
            response = client.post("/v1/chat/completions",
                                   json=chat_body(max_tokens=max_tokens, stream=True))
            results.append((response.status_code, response.text))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_queue_full_is_429_with_retry_after(server):
    results: list = []
    running = _background_stream(server, results, 40)
    _wait(lambda: _health(server)["running"] == 1)
    waiting = _background_stream(server, results, 2)
    _wait(lambda: _health(server)["waiting"] == 1)
    with server.http() as client:
        response = client.post("/v1/chat/completions", json=chat_body())
        check_envelope(response, 429, code="server_overloaded")
        assert int(response.headers["Retry-After"]) >= 1
        streamed = client.post("/v1/chat/completions", json=chat_body(stream=True))
        check_envelope(streamed, 429)
    running.join(60)
    waiting.join(60)
    assert [status for status, _ in results] == [200, 200]
    assert all(text.endswith("data: [DONE]\n\n") for _, text in results)


def test_client_disconnect_mid_stream_frees_the_slot(server):
    before = _metric(server, "loradock_client_disconnects_total")
    with server.http() as client, client.stream(
        "POST", "/v1/chat/completions", json=chat_body(max_tokens=200, stream=True)
    ) as response:
        lines = response.iter_lines()
        assert sse_events(line for line, _ in zip(lines, range(3), strict=False))
        assert _health(server)["running"] == 1
    # 200 tokens would take 10 s; the slot is free long before
    _wait(lambda: _health(server)["running"] == 0, timeout_s=5)
    _wait(lambda: _metric(server, "loradock_client_disconnects_total") == before + 1)
    with server.http() as client:
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_client_disconnect_while_waiting_non_stream_frees_the_slot(server):
    before = _metric(server, "loradock_client_disconnects_total")
    with server.http(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=chat_body(max_tokens=200))
    _wait(lambda: _health(server)["running"] == 0, timeout_s=5)
    _wait(lambda: _metric(server, "loradock_client_disconnects_total") == before + 1)


def test_background_server_for_demo_scripts(home):
    config = ServerConfig(engine="fake", port=0, log_level="warning")  # LORADOCK_HOME = home
    with BackgroundServer(config) as url:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        reply = openai.OpenAI(base_url=url + "/v1", api_key="none").chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.usage.completion_tokens == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def test_sigterm_lets_the_running_stream_finish_then_exits_0(server):
    """Runs last: it stops the module's server."""
    with server.http() as client, client.stream(
        "POST", "/v1/chat/completions", json=chat_body(max_tokens=30, stream=True)
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.proc.send_signal(15)
        rest = list(lines)
    events = sse_events([first, *rest])
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if e["choices"])
    assert events[-2]["choices"][0]["finish_reason"] == "length" and text
    assert server.proc.wait(60) == 0
    log = server.log_text()
    assert "draining" in log and "engine stopped" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
