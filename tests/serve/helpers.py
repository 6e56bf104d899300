"""Helpers for serve tests: a real server subprocess on 127.0.0.1, and in-process fake-engine apps.

Real server (one per test module, via a module-scoped fixture)::

    server = start_server(home, engine="peft", args=["--base-dtype", "fp32"])
    client = server.client()            # openai.OpenAI pointed at it
    ...
    assert server.stop() == 0           # SIGTERM, waits, returns the exit status
    server.log_text()                   # everything the server wrote (stdout + stderr)

`start_server` picks a free port, runs ``python -m loradock.cli_serve`` with ``LORADOCK_HOME``
set to ``home`` (register adapters there before starting) and the shared converted-base cache, and
waits for ``GET /health`` to answer 200.

In-process (HTTP-layer unit tests with the FakeEngine)::

    state = fake_state(store, formatter, token_delay_s=0.01)
    with TestClient(create_app(state)) as client: ...
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running ``loradock serve`` subprocess."""

    proc: subprocess.Popen
    url: str
    home: Path
    log_path: Path

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return self.url + "/v1"

    def client(self, api_key: str = "none", **kwargs: Any):
        """An official ``openai.OpenAI`` client for this server (no retries by default)."""
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 300)
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, **kwargs)

    def http(self, api_key: str | None = None, timeout: float = 300) -> httpx.Client:
        """A plain httpx client (for raw bodies and headers)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log_text(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM, wait for the exit, return its status (kills after ``timeout_s``)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def server_env(home: Path) -> dict[str, str]:
    """Environment for a server subprocess using ``home`` and the shared base cache."""
    from tests.conftest import TEST_CACHE

    env = dict(os.environ)
    env.update({
        "LORADOCK_HOME": str(home),
        "LORADOCK_CACHE": str(TEST_CACHE / "bases"),
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_server(
    home: Path,
    *,
    engine: str = "fake",
    args: Sequence[str] = (),
    log_path: Path | None = None,
    timeout_s: float = 600,
) -> ServerProcess:
    """Start ``loradock serve`` on a free 127.0.0.1 port and wait until ``/health`` is 200.

    Args:
        home: LORADOCK_HOME of the server (register adapters there first).
        engine: ``--engine`` value.
        args: More CLI flags (e.g. ``["--base-dtype", "fp32", "--api-keys", path]``).
        log_path: Where stdout+stderr go (default ``home/../server-PORT.log``).
        timeout_s: Give up (and kill it) after this long.

    Raises:
        RuntimeError: The process died or never became healthy (with the log tail).
    """
    port = free_port()
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    log_path = log_path or home.parent / f"server-{port}.log"
    cmd = [sys.executable, "-m", "loradock.cli_serve", "--engine", engine,
           "--host", "127.0.0.1", "--port", str(port), *args]
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(home), stdout=log_file,
                            stderr=subprocess.STDOUT)
    log_file.close()
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", home, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if not server.alive():
            tail = server.log_text()[-4000:]
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        if time.monotonic() > deadline:
            server.stop(10)
            raise RuntimeError(f"server not healthy after {timeout_s} s:\n"
                               f"{server.log_text()[-4000:]}")
        time.sleep(0.25)


@contextlib.contextmanager
def running_server(home: Path, **kwargs: Any) -> Iterator[ServerProcess]:
    """`start_server` as a context manager that always stops the process."""
    server = start_server(home, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse SSE ``data:`` lines into JSON objects (``"[DONE]"`` kept as the string)."""
    events: list[Any] = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# -- in-process apps with the FakeEngine ------------------------------------------------------


def fake_state(store, formatter, *, keys=None, max_running: int = 4, max_queue: int = 4,
               **options: Any):
    """An `AppState` around a FakeEngine (options as in `serve.engines.fake`)."""
    from serve.engine import EngineConfig, create_engine
    from serve.http.state import AppState

    base = store.base("smollm2")
    config = EngineConfig(base=base, max_running=max_running, max_queue=max_queue,
                          max_adapters=2, options=options)
    engine = create_engine("fake", config)
    return AppState(store=store, base=base, engine=engine, formatter=formatter, keys=keys,
                    max_model_len=256, request_timeout_s=30)


def chat_body(model: str = "smollm2", content: str = "Hello", **extra: Any) -> dict[str, Any]:
    """A minimal valid chat request body."""
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, **extra}


def _chat(**fields: Any) -> bytes:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


_DROP = object()

# (id, path, raw body, expected status, expected param (None: not checked), expected code)
HOSTILE_BODIES: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("bad-json", "chat", b'{"model": "smollm2", "messages": [', 400, None, "invalid_request"),
    ("empty-body", "chat", b"", 400, None, "invalid_request"),
    ("not-an-object", "chat", b"[1, 2, 3]", 400, None, "invalid_request"),
    ("not-utf8", "chat", b'{"model": "\xff\xfe"}', 400, None, "invalid_request"),
    ("nan", "chat", _chat(temperature="__NAN__").replace(b'"__NAN__"', b"NaN"), 400, None, None),
    ("deep-nesting", "chat", b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_request"),
    ("temperature-string", "chat", _chat(temperature="0.5"), 400, "temperature", None),
    ("temperature-negative", "chat", _chat(temperature=-1), 400, "temperature", None),
    ("top-p-zero", "chat", _chat(top_p=0), 400, "top_p", None),
    ("messages-string", "chat", _chat(messages="hi"), 400, "messages", None),
    ("messages-empty", "chat", _chat(messages=[]), 400, "messages", None),
    ("role-unknown", "chat", _chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages[0].role", None),
    ("role-tool-without-call-id", "chat", _chat(messages=[{"role": "tool", "content": "x"}]),
     400, "messages[0].tool_call_id", None),
    ("content-missing", "chat", _chat(messages=[{"role": "user"}]), 400,
     "messages[0].content", None),
    ("content-image", "chat", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400,
     "messages[0].content", None),
    ("message-extra-field", "chat", _chat(messages=[{"role": "user", "content": "x",
                                                     "nickname": "bob"}]), 400,
     "messages[0].nickname", None),
    ("model-missing", "chat", _chat(model=_DROP), 400, "model", None),
    ("model-number", "chat", _chat(model=42), 400, "model", None),
    ("model-traversal", "chat", _chat(model="smollm2+../../etc"), 400, "model", "invalid_name"),
    ("model-traversal-base", "chat", _chat(model="../../etc/passwd"), 400, "model",
     "invalid_name"),
    ("model-unknown-adapter", "chat", _chat(model="smollm2+no-such-adapter"), 404, "model",
     "model_not_found"),
    ("model-unknown-base", "chat", _chat(model="gpt-4o"), 404, "model", "model_not_found"),
    ("max-tokens-huge", "chat", _chat(max_tokens=10**12), 400, "max_completion_tokens",
     "context_length_exceeded"),
    ("max-tokens-negative", "chat", _chat(max_tokens=-5), 400, "max_tokens", None),
    ("max-tokens-bool", "chat", _chat(max_tokens=True), 400, "max_tokens", None),
    ("max-tokens-disagree", "chat", _chat(max_tokens=2, max_completion_tokens=3), 400,
     "max_completion_tokens", None),
    ("n-above-limit", "chat", _chat(n=9), 400, "n", None),
    ("tools", "chat", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tools", None),
    ("logit-bias-outside-vocab", "chat", _chat(logit_bias={"99999999": 10}), 400, "logit_bias",
     None),
    ("logit-bias-not-an-id", "chat", _chat(logit_bias={"abc": 10}), 400, "logit_bias", None),
    ("logit-bias-too-big", "chat", _chat(logit_bias={"42": 500}), 400, "logit_bias", None),
    ("presence-penalty-range", "chat", _chat(presence_penalty=3), 400, "presence_penalty", None),
    ("top-k-negative", "chat", _chat(top_k=-5), 400, "top_k", None),
    ("tool-choice-without-tools", "chat", _chat(tool_choice="required"), 400, "tool_choice",
     None),
    ("functions-deprecated", "chat", _chat(functions=[{"name": "f"}]), 400, "functions", None),
    ("unknown-field", "chat", _chat(frobnicate=True), 400, "frobnicate", None),
    ("stop-list-10", "chat", _chat(stop=[str(i) for i in range(10)]), 400, "stop", None),
    ("stop-number", "chat", _chat(stop=5), 400, "stop", None),
    ("seed-huge", "chat", _chat(seed=2**70), 400, "seed", None),
    ("top-logprobs-without-logprobs", "chat", _chat(top_logprobs=3), 400, "top_logprobs", None),
    ("top-logprobs-too-many", "chat", _chat(logprobs=True, top_logprobs=50), 400,
     "top_logprobs", None),
    ("stream-options-without-stream", "chat", _chat(stream_options={"include_usage": True}),
     400, "stream_options", None),
    ("response-format-schema-missing", "chat", _chat(response_format={"type": "json_schema"}),
     400, "response_format.json_schema", None),
    ("response-format-schema-refused", "chat", _chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}), 400,
     "response_format.json_schema.schema", None),
    ("response-format-unknown", "chat", _chat(response_format={"type": "yaml"}), 400,
     "response_format.type", None),
    ("json-object-without-json-word", "chat", _chat(response_format={"type": "json_object"}),
     400, "response_format", None),
    ("prompt-10mb", "chat", _chat(messages=[{"role": "user", "content": "a " * 5_000_000}]),
     413, None, "request_too_large"),
    ("completion-prompt-tokens-outside-vocab", "completions",
     json.dumps({"model": "smollm2", "prompt": [1, 2, 99999999]}).encode(), 400, "prompt", None),
    ("completion-prompt-batch-too-big", "completions",
     json.dumps({"model": "smollm2", "prompt": ["x"] * 33}).encode(), 400, "prompt", None),
    ("completion-echo", "completions",
     json.dumps({"model": "smollm2", "prompt": "x", "echo": True}).encode(), 400, "echo", None),
    ("completion-suffix", "completions",
     json.dumps({"model": "smollm2", "prompt": "x", "suffix": "y"}).encode(), 400, "suffix",
     None),
]
HOSTILE_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def check_envelope(response: httpx.Response, status: int, param: str | None = None,
                   code: str | None = None) -> dict[str, Any]:
    """Assert an OpenAI error envelope with ``status`` (and ``param``/``code`` when given)."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
